-- KEYS: key hash, rate counter, job hash, slug set, expiry zset, idempotency record, queued
--       set, the key's queued set
-- ARGV: prefix, job id, slug, cost, rpm, rate ttl s, job ttl ms, expires_at, created_at, now,
--       idempotency body hash ('' for none), its expires_at, its ttl ms, key id, history
--       record's expires_at, its ttl ms, usage day, the day counters' expires_at, their ttl ms,
--       prompt kept ('1'/'0'), the prompt, the cluster's max queued (0: none), queue limits
--       apply ('1'/'0': a refused job is never queued), job field/value pairs
local job_id, slug = ARGV[2], ARGV[3]
local cost, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local key = redis.call('HMGET', KEYS[1], 'balance_micro', 'revoked', 'max_queued')
if not key[1] or key[2] == '1' then return {'unauthenticated'} end
local balance = tonumber(key[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- The same submit again: a retry after a lost reply. It went through the first time.
  return {'ok', string.format('%.0f', balance), tostring(rpm > 0 and math.max(rpm - used, 0) or -1)}
end
local idem_hash = ARGV[11]
if idem_hash ~= '' then
  local seen, original, valid_until = unpack(redis.call('HMGET', KEYS[6], 'body_hash', 'job_id',
    'expires_at'))
  if seen and tonumber(valid_until) > tonumber(ARGV[10]) then
    if seen ~= idem_hash then
      return {'idempotency_conflict', original, redis.call('HGET', job_key(original), 'status')
        or 'EXPIRED'}
    end
    local left = rpm > 0 and math.max(rpm - used, 0) or -1
    return {'replay', string.format('%.0f', balance), tostring(left), original}
  end
end
if ARGV[23] == '1' then
  local max_queued, key_max = tonumber(ARGV[22]), tonumber(key[3]) or 0
  if max_queued > 0 and redis.call('SCARD', KEYS[7]) >= max_queued then return {'queue_full'} end
  if key_max > 0 and redis.call('SCARD', KEYS[8]) >= key_max then
    return {'key_queue_full', tostring(key_max)}
  end
end
if rpm > 0 and used >= rpm then return {'rate_limited'} end
if cost > balance then return {'insufficient', string.format('%.0f', balance)} end
if cost > 0 then balance = redis.call('HINCRBY', KEYS[1], 'balance_micro', -cost) end
if rpm > 0 then
  used = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('HSET', KEYS[3], unpack(ARGV, 24))
if idem_hash ~= '' then
  redis.call('DEL', KEYS[6])
  redis.call('HSET', KEYS[6], 'body_hash', idem_hash, 'job_id', job_id, 'expires_at', ARGV[12])
  redis.call('PEXPIRE', KEYS[6], ARGV[13])
end
-- A job the API refused (its content policy) comes in FAILED already, at no cost: it is kept
-- and announced like any ending, never queued.
local refused = redis.call('HGET', KEYS[3], 'status') == 'FAILED'
if not refused then
  local stream = queue_key(slug)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
  end
  local entry = redis.call('XADD', stream, '*', 'job', job_id, 'created_at', ARGV[9])
  redis.call('HSET', KEYS[3], 'entry', entry, 'fifo', redis.call('INCR', fifo_key()))
  -- Handed out at once to the placeholder consumer: claims pick jobs by fair order, not stream
  -- order, and XCLAIM the picked entry to the worker, so XPENDING shows who holds what.
  for _ = 1, 1000 do
    local got = redis.call('XREADGROUP', 'GROUP', GROUP, WAITING_CONSUMER, 'COUNT', 1,
      'STREAMS', stream, '>')
    if not got or not got[1] or not got[1][2][1] or got[1][2][1][1] == entry then break end
  end
  joined_queued(job_id)
  fair_join(job_id)
end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('SADD', KEYS[4], slug)
redis.call('ZADD', KEYS[5], ARGV[8], job_id)
-- Its history record (announce keeps it in step from here on) and the day's usage counters.
local key_id, day = ARGV[14], ARGV[17]
local hist = history_key(job_id)
redis.call('HSET', hist, 'request_id', job_id, 'key_id', key_id, 'slug', slug, 'status',
  'QUEUED', 'created_at', ARGV[9], 'day', day, 'cost_micro', ARGV[4], 'expires_at', ARGV[15])
if ARGV[20] == '1' then redis.call('HSET', hist, 'prompt', ARGV[21]) end
redis.call('PEXPIRE', hist, ARGV[16])
redis.call('ZADD', history_by_key_key(key_id), ARGV[9], job_id)
redis.call('ZADD', history_expiry_key(), ARGV[15], job_id)
local usage = usage_key(key_id, day)
redis.call('HINCRBY', usage, slug .. ':count', 1)
redis.call('HINCRBY', usage, slug .. ':cost_micro', ARGV[4])
redis.call('PEXPIRE', usage, ARGV[19])
redis.call('ZADD', usage_expiry_key(), ARGV[18], key_id .. ' ' .. day)
if refused then
  local kind, message = unpack(redis.call('HMGET', KEYS[3], 'error_kind', 'error'))
  announce(job_id, EVENT_FAILED, ARGV[10], kind, message)
  redis.call('PUBLISH', done_channel(), job_id)
else
  announce(job_id, EVENT_QUEUED, ARGV[10])
  redis.call('PUBLISH', wake_channel(), slug)
end
return {'ok', string.format('%.0f', balance), tostring(rpm > 0 and rpm - used or -1), announced}
