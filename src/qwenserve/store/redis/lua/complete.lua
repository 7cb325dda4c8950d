-- KEYS: job hash; ARGV: prefix, job id, worker id, result JSON, now
-- Returns the events appended (none: not this worker's job).
local status, owner, slug, entry = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker_id',
  'slug', 'entry'))
if status ~= 'PROCESSING' or owner ~= ARGV[3] then return announced end
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', 'result', ARGV[4], 'finished_at', ARGV[5])
redis.call('HDEL', KEYS[1], 'lease_until')
leave_queue(slug, ARGV[2], entry)
announce(ARGV[2], EVENT_COMPLETED, ARGV[5])
redis.call('PUBLISH', done_channel(), ARGV[2])
return announced
