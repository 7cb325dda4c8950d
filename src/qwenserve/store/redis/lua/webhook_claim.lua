-- KEYS: due zset
-- ARGV: prefix, now, lease until, owner, limit
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[5]))
local claimed = {}
for _, job_id in ipairs(ids) do
  local delivery = webhook_key(job_id)
  if redis.call('HGET', delivery, 'status') == 'pending' then
    redis.call('HSET', delivery, 'owner', ARGV[4], 'lease_until', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[3], job_id)
    table.insert(claimed, redis.call('HGETALL', delivery))
  else
    -- Ended, or gone with its TTL: nothing left to send.
    redis.call('ZREM', KEYS[1], job_id)
  end
end
return claimed
