-- KEYS: slug set; ARGV: prefix
local rows = {}
for _, slug in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local stream = queue_key(slug)
  local processing = redis.call('ZCARD', leases_key(slug))
  -- Claimed but not denoising yet (looked ahead, loading inputs): no progress reported.
  local waiting = 0
  for _, job_id in ipairs(redis.call('ZRANGE', leases_key(slug), 0, -1)) do
    if redis.call('HEXISTS', job_key(job_id), 'progress_step') == 0 then waiting = waiting + 1 end
  end
  local queued = redis.call('XLEN', stream) - processing
  local oldest = ''
  local last = last_delivered(stream)
  if last then
    local head = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
    if head[1] then
      for i = 1, #head[1][2], 2 do
        if head[1][2][i] == 'created_at' then oldest = head[1][2][i + 1] end
      end
    end
  end
  local back = redis.call('ZRANGE', requeued_key(slug), 0, 0, 'WITHSCORES')
  if back[2] and (oldest == '' or tonumber(back[2]) < tonumber(oldest)) then oldest = back[2] end
  rows[#rows + 1] = {slug, math.max(queued, 0), processing, oldest, waiting}
end
return rows
