-- A submit its replicas did not confirm is withdrawn (store/redis/replication.py).
-- KEYS: job hash, its idempotency record ('' for none)
-- ARGV: prefix, job id, kind, message, now
-- Returns {outcome, events appended}: 'withdrawn' (failed, refunded), 'kept' (it ran to its end
-- during the wait: its charge and idempotency record stay, so a retry with the same key is
-- answered with it), 'refunded' (ended too, but no key finds it again: it costs nothing) or
-- 'none' (nothing of its own: a replay, or a job refused at no cost).
local job_id = ARGV[2]
local status, cost, key_id = unpack(redis.call('HMGET', KEYS[1], 'status', 'cost_micro',
  'key_id'))
local record = KEYS[2] ~= '' and redis.call('HGET', KEYS[2], 'job_id') == job_id
if not status then return {'none', announced} end
if status == 'QUEUED' or status == 'PROCESSING' then
  fail_and_refund(job_id, ARGV[3], ARGV[4], ARGV[5])
  if record then redis.call('DEL', KEYS[2]) end
  return {'withdrawn', announced}
end
cost = tonumber(cost) or 0
if cost <= 0 then
  if record then redis.call('DEL', KEYS[2]) end
  return {'none', announced}
end
-- A fast job: claimed, run and ended within the wait. The work is done and it stays as it is.
if record then return {'kept', announced} end
refund(KEYS[1])
redis.call('HSET', KEYS[1], 'cost_micro', '0')
local hist = history_key(job_id)
if redis.call('EXISTS', hist) == 1 then
  local slug, day = unpack(redis.call('HMGET', hist, 'slug', 'day'))
  redis.call('HSET', hist, 'cost_micro', '0')
  redis.call('HINCRBY', usage_key(key_id, day), slug .. ':cost_micro', -cost)
end
return {'refunded', announced}
