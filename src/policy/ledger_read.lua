-- Reads one group's ledger. KEYS: 1 the day's hash, 2 the month's. Returns both as HGETALL does.
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
