-- Reads the per-minute hashes of the activity ring.
-- KEYS[i]: the hash of one minute. Returns each hash's fields and values (HGETALL), in order.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
end
return out
