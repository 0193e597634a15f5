-- Adds one replica's counts to the per-minute hashes of the activity ring.
-- KEYS[i]: the hash of one minute (llm-proxy:{activity}:minute:<minutes since the epoch>).
-- ARGV[1]: the expiry of every hash, in ms. Then, for each key in turn: how many fields follow,
-- and that many field, increment pairs.
local ttl = ARGV[1]
local at = 2
for _, key in ipairs(KEYS) do
  local fields = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, fields do
    redis.call('HINCRBY', key, ARGV[at], ARGV[at + 1])
    at = at + 2
  end
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
