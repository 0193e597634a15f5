-- Announces a signal to every replica, in one round trip.
-- ARGV[1]: the channel, ARGV[2]: the message.
-- A breaker opening also leaves its state for replicas that start later:
-- KEYS[1]: the breaker's key, KEYS[2]: the index of breaker names,
-- ARGV[3]: the upstream's name, ARGV[4]: reopenings, ARGV[5]: remaining ms.
-- The later end wins: a shorter opening (another replica's, seen a moment apart) does not cut
-- a longer one short. Every key expires when the opening ends, the index with the last one.
if #KEYS == 2 then
  local ms = tonumber(ARGV[5])
  if redis.call('PTTL', KEYS[1]) < ms then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ms)
  end
  redis.call('SADD', KEYS[2], ARGV[3])
  if redis.call('PTTL', KEYS[2]) < ms then
    redis.call('PEXPIRE', KEYS[2], ms)
  end
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
