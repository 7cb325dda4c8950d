-- Once per namespace, before its first claim: jobs queued by a qwenserve from before weighted
-- fair queuing (picked in stream order, never listed in waiting:/fairq:) join the fair sets in
-- their stream order, and every entry not yet handed out goes to the waiting consumer.
-- KEYS: slug set, the done marker; ARGV: prefix. Returns how many jobs joined.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local joined = 0
for _, slug in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local stream = queue_key(slug)
  if redis.call('EXISTS', stream) == 1 then
    for _ = 1, 100000 do
      local got = redis.call('XREADGROUP', 'GROUP', GROUP, WAITING_CONSUMER, 'COUNT', 1000,
        'STREAMS', stream, '>')
      if not got or not got[1] or #got[1][2] == 0 then break end
    end
    for _, e in ipairs(redis.call('XRANGE', stream, '-', '+')) do
      local job_id
      for i = 1, #e[2], 2 do
        if e[2][i] == 'job' then job_id = e[2][i + 1] end
      end
      if job_id then
        local job = job_key(job_id)
        local status, fifo = unpack(redis.call('HMGET', job, 'status', 'fifo'))
        if status == 'QUEUED' and not fifo then
          redis.call('HSET', job, 'fifo', redis.call('INCR', fifo_key()))
          fair_join(job_id)
          joined = joined + 1
        end
      end
    end
  end
  redis.call('DEL', PREFIX .. 'requeued:' .. slug)  -- the old index of released jobs
end
redis.call('SET', KEYS[2], '1')
return joined
