-- KEYS: key hash
-- ARGV: prefix, candidate secret, rotate (1/0)
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local current = redis.call('HGET', KEYS[1], 'webhook_secret')
if ARGV[3] == '1' or not current or current == '' then
  redis.call('HSET', KEYS[1], 'webhook_secret', ARGV[2])
  return ARGV[2]
end
return current
