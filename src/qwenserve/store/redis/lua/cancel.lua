-- Its owner stops a job.
-- KEYS: job hash; ARGV: prefix, job id, key id, now
-- Returns {'unknown'}, {'ended', status} or {'ok', job hash fields, events appended}.
local job_id, now = ARGV[2], ARGV[4]
local status, owner, expires, lease, cancel = unpack(redis.call('HMGET', KEYS[1], 'status',
  'key_id', 'expires_at', 'lease_until', 'cancel_requested_at'))
if not status or owner ~= ARGV[3] or tonumber(expires) <= tonumber(now) then
  return {'unknown'}
end
if status ~= 'QUEUED' and status ~= 'PROCESSING' then return {'ended', status} end
if status == 'QUEUED' then
  fail_and_refund(job_id, CANCELLED, CANCELLED_BEFORE_START, now)
else
  if not cancel then
    redis.call('HSET', KEYS[1], 'cancel_requested_at', now)
    announce(job_id, EVENT_CANCEL_REQUESTED, now)
    -- Worker processes read the log now: the holder stops the job at its next step.
    redis.call('PUBLISH', cancel_channel(), job_id)
  end
  if lease and tonumber(lease) <= tonumber(now) then
    -- Its worker stopped renewing: nobody would act on the request.
    fail_and_refund(job_id, CANCELLED, CANCELLED_WORKER_LOST, now)
  end
end
return {'ok', redis.call('HGETALL', KEYS[1]), announced}
