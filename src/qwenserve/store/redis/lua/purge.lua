-- KEYS: expiry zset; ARGV: prefix, now, batch size
-- Returns {the purged jobs' hash fields, the events appended}.
local purged = {}
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0,
                                   ARGV[3])) do
  local job = job_key(job_id)
  local data = redis.call('HGETALL', job)
  if #data > 0 then
    local status, slug, entry, cancel, key_id = unpack(redis.call('HMGET', job, 'status', 'slug',
      'entry', 'cancel_requested_at', 'key_id'))
    if status == 'QUEUED' or status == 'PROCESSING' then
      refund(job)
      -- It never finished and now never will: the log says so, and whoever waits for it stops
      -- waiting.
      local kind, message = EXPIRED, EXPIRED_RUNNING
      if cancel then kind, message = CANCELLED, CANCELLED_AT_EXPIRY
      elseif status == 'QUEUED' then message = EXPIRED_QUEUED end
      announce(job_id, EVENT_FAILED, ARGV[2], kind, message)
      redis.call('PUBLISH', done_channel(), job_id)
    end
    leave_queue(slug, job_id, entry)
    left_queued(job_id, key_id)
    redis.call('DEL', job)
    purged[#purged + 1] = data
  else
    left_queued(job_id, nil)  -- gone under Redis's feet: its key's set keeps a stale id
  end
  redis.call('ZREM', KEYS[1], job_id)
end
return {purged, announced}
