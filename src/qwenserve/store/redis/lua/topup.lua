-- KEYS: key hash; ARGV: prefix, amount (micro-USD)
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'balance_micro', ARGV[2])
