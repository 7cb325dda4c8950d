-- KEYS: slug set; ARGV: prefix
local rows = {}
for _, slug in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local processing = redis.call('ZCARD', leases_key(slug))
  -- Claimed but not denoising yet (looked ahead, loading inputs): no progress reported.
  local waiting = 0
  for _, job_id in ipairs(redis.call('ZRANGE', leases_key(slug), 0, -1)) do
    if redis.call('HEXISTS', job_key(job_id), 'progress_step') == 0 then waiting = waiting + 1 end
  end
  local queued = redis.call('ZCARD', waiting_key(slug))
  local oldest = ''
  local head = redis.call('ZRANGE', waiting_key(slug), 0, 0)[1]
  if head then oldest = redis.call('HGET', job_key(head), 'created_at') or '' end
  rows[#rows + 1] = {slug, queued, processing, oldest, waiting}
end
return rows
