-- KEYS: due zset
-- ARGV: prefix, now
-- A claim scores a delivery by its lease's end: those scored after now are leased. Each goes
-- back to its own due time, with no owner (whose late record then changes nothing).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf')
local released = 0
for _, job_id in ipairs(ids) do
  local delivery = webhook_key(job_id)
  local current = redis.call('HMGET', delivery, 'status', 'owner', 'next_attempt_at')
  if current[1] == 'pending' and current[2] and current[2] ~= '' then
    redis.call('HSET', delivery, 'owner', '', 'lease_until', '')
    redis.call('ZADD', KEYS[1], current[3], job_id)
    released = released + 1
  end
end
return released
