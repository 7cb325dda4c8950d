-- KEYS: due zset, cursor
-- ARGV: prefix, now, record ttl ms, cursor, then (job id, event id) pairs of terminal events
local now = ARGV[2]
local added = 0
for i = 5, #ARGV, 2 do
  local job_id, event_id = ARGV[i], ARGV[i + 1]
  local delivery = webhook_key(job_id)
  if redis.call('EXISTS', delivery) == 0 then
    local job = redis.call('HMGET', job_key(job_id), 'webhook_url', 'key_id')
    if job[1] and job[1] ~= '' then
      redis.call('HSET', delivery, 'job_id', job_id, 'event_id', event_id, 'key_id', job[2],
        'url', job[1], 'status', 'pending', 'created_at', now, 'attempts', '[]',
        'next_attempt_at', now)
      redis.call('PEXPIRE', delivery, ARGV[3])
      redis.call('ZADD', KEYS[1], now, job_id)
      added = added + 1
    end
  end
end
redis.call('SET', KEYS[2], ARGV[4])
return added
