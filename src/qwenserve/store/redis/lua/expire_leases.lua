-- KEYS: leases zsets; ARGV: prefix, now
local count = 0
for _, leases in ipairs(KEYS) do
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', leases, '(' .. ARGV[2], '+inf')) do
    local status, slug = unpack(redis.call('HMGET', job_key(job_id), 'status', 'slug'))
    if status == 'PROCESSING' then
      redis.call('HSET', job_key(job_id), 'lease_until', ARGV[2])
      redis.call('ZADD', leases, ARGV[2], job_id)
      redis.call('PUBLISH', wake_channel(), slug)
      count = count + 1
    else
      redis.call('ZREM', leases, job_id)
    end
  end
end
return count
