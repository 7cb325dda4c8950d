-- KEYS: key hash; ARGV: prefix, field/value pairs to set. Returns 0 when there is no such key.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return 1
