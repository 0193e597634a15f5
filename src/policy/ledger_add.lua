-- Adds a batch of spend to the ledger's hashes.
-- KEYS: the hashes (day and month keys of each group).
-- ARGV: first one expiry in ms per key, in KEYS' order; then, per (hash, key) pair, four values:
-- the hash's index in KEYS (1-based), the key, nano-dollars, requests.
local n = #KEYS
local i = n + 1
while i + 3 <= #ARGV do
  local hash = KEYS[tonumber(ARGV[i])]
  redis.call('HINCRBY', hash, 'u:' .. ARGV[i + 1], ARGV[i + 2])
  redis.call('HINCRBY', hash, 'r:' .. ARGV[i + 1], ARGV[i + 3])
  i = i + 4
end
for j = 1, n do
  redis.call('PEXPIRE', KEYS[j], ARGV[j])
end
return n
