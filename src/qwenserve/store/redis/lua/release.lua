-- KEYS: job hash; ARGV: prefix, job id, worker id, now
-- Returns the events appended (none: not this worker's job).
local status, owner, attempts, slug, created_at, cancel = unpack(redis.call('HMGET', KEYS[1],
  'status', 'worker_id', 'attempts', 'slug', 'created_at', 'cancel_requested_at'))
if status ~= 'PROCESSING' or owner ~= ARGV[3] then return announced end
if cancel then
  -- Its owner wanted it stopped: it ends here rather than waiting in the queue again.
  fail_and_refund(ARGV[2], CANCELLED, CANCELLED_RELEASED, ARGV[4])
  return announced
end
attempts = tonumber(attempts) or 0
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempts', math.max(attempts - 1, 0))
redis.call('HDEL', KEYS[1], 'worker_id', 'lease_until')
if attempts <= 1 then redis.call('HDEL', KEYS[1], 'started_at') end
clear_progress(KEYS[1])
joined_queued(ARGV[2])
announce(ARGV[2], EVENT_QUEUED, ARGV[4])
redis.call('ZREM', leases_key(slug), ARGV[2])
redis.call('SREM', running_key(redis.call('HGET', KEYS[1], 'key_id') or ''), ARGV[2])
fair_unclaim(ARGV[2])  -- not charged twice: the claim it gives back is undone
fair_join(ARGV[2])  -- back in its old place: its FIFO score is its submit's
redis.call('PUBLISH', wake_channel(), slug)
return announced
