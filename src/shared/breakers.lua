-- The breakers open now, for a replica that starts or reconnects.
-- KEYS[1]: the index of breaker names. ARGV[1]: the prefix of a breaker's key (same hash tag).
-- Returns name, reopenings, remaining ms, for each open breaker; drops names whose opening
-- ended from the index.
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. name
  local ttl = redis.call('PTTL', key)
  if ttl > 0 then
    local reopenings = redis.call('GET', key)
    if reopenings then
      table.insert(out, name)
      table.insert(out, reopenings)
      table.insert(out, tostring(ttl))
    end
  else
    if ttl == -1 then
      -- Not written by us (ours always expire): gone, so that no key lives forever.
      redis.call('DEL', key)
    end
    redis.call('SREM', KEYS[1], name)
  end
end
return out
