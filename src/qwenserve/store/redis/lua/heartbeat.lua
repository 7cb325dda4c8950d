-- One worker's heartbeat for every job it holds.
-- KEYS: none; ARGV: prefix, worker id, lease_until, now, then per job: id, step, total
--       ('' and '' when there is no progress to record)
-- Returns one flag per job, in order: 0 lost, 1 owned, 2 owned and cancel-requested.
local worker, lease_until, now = ARGV[2], ARGV[3], ARGV[4]
local flags = {}
for i = 5, #ARGV, 3 do
  local job_id, step, total = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local job = job_key(job_id)
  local status, owner, slug, entry, cancel = unpack(redis.call('HMGET', job, 'status',
    'worker_id', 'slug', 'entry', 'cancel_requested_at'))
  if status ~= 'PROCESSING' or owner ~= worker then
    flags[#flags + 1] = 0
  else
    redis.call('HSET', job, 'lease_until', lease_until)
    redis.call('ZADD', leases_key(slug), lease_until, job_id)
    if entry then
      -- Resets the pending entry's idle time, so XPENDING shows a live worker as such.
      redis.call('XCLAIM', queue_key(slug), GROUP, worker, 0, entry, 'JUSTID')
    end
    if step ~= '' then
      redis.call('HSET', job, 'progress_step', step, 'progress_total', total, 'progress_at', now)
    end
    flags[#flags + 1] = cancel and 2 or 1
  end
end
return flags
