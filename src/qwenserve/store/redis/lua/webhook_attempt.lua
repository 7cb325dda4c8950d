-- KEYS: delivery hash, due zset
-- ARGV: prefix, job id, owner, status, attempt JSON, next attempt at ('' when none), body
local current = redis.call('HMGET', KEYS[1], 'owner', 'status', 'attempts', 'body')
if current[1] ~= ARGV[3] or current[2] ~= 'pending' then return 0 end
-- Appended as text: cjson would round the times to 14 digits.
local attempts = current[3] or '[]'
if attempts == '[]' then
  attempts = '[' .. ARGV[5] .. ']'
else
  attempts = string.sub(attempts, 1, -2) .. ',' .. ARGV[5] .. ']'
end
redis.call('HSET', KEYS[1], 'attempts', attempts, 'status', ARGV[4],
  'next_attempt_at', ARGV[6], 'owner', '', 'lease_until', '')
if not current[4] or current[4] == '' then redis.call('HSET', KEYS[1], 'body', ARGV[7]) end
if ARGV[4] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
else
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
