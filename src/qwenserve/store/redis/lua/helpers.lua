-- Shared by every job script (after the key builders and the constants, before the script).
-- Numbers that are stored (times, leases) are passed in as text from Python and stored as is:
-- Lua would print a double with 14 digits only.

local function entry_before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq = tonumber(ams) or 0, tonumber(aseq) or 0
  bms, bseq = tonumber(bms) or 0, tonumber(bseq) or 0
  if ams ~= bms then return ams < bms end
  return aseq < bseq
end

-- The id of the last entry the group handed out, or nil when the stream or group is missing.
local function last_delivered(stream)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] end
      if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if name == GROUP then return last end
  end
  return nil
end

-- The request's history record and its day's usage counters follow each transition, in the
-- transition's own script (store/history.py). A failure is refunded in the same step, so it
-- costs 0, unless it keeps its charge (``charged``). Jobs without a record (submitted before
-- history existed) are left alone.
local function history_follow(job_id, event_type, now_text, error_kind, message, charged)
  local hist = history_key(job_id)
  if redis.call('EXISTS', hist) == 0 then return end
  if event_type == EVENT_QUEUED or event_type == EVENT_PROCESSING then
    redis.call('HSET', hist, 'status', string.upper(event_type))
    return
  end
  if event_type ~= EVENT_COMPLETED and event_type ~= EVENT_FAILED then return end
  local key_id, slug, day, cost = unpack(redis.call('HMGET', hist, 'key_id', 'slug', 'day',
    'cost_micro'))
  local usage = usage_key(key_id, day)
  redis.call('HSET', hist, 'status', string.upper(event_type), 'finished_at', now_text)
  if event_type == EVENT_COMPLETED then
    local result = redis.call('HGET', job_key(job_id), 'result')
    local seconds = result and tonumber(cjson.decode(result)['inference_time_s'])
    if seconds then
      redis.call('HSET', hist, 'inference_time_s', string.format('%.17g', seconds))
      redis.call('HINCRBY', usage, slug .. ':gpu_ms', math.floor(seconds * 1000 + 0.5))
    end
  else
    redis.call('HSET', hist, 'error_kind', error_kind or '', 'error', message or '')
    if not charged then
      redis.call('HSET', hist, 'cost_micro', '0')
      local refunded = tonumber(cost) or 0
      if refunded ~= 0 then redis.call('HINCRBY', usage, slug .. ':cost_micro', -refunded) end
    end
  end
end

-- Append one event to the log (and to the job's own stream, under the same id), kept for the
-- job's result TTL from now. Called in the same script as the transition it announces.
local function announce(job_id, event_type, now_text, error_kind, message, charged)
  local job = job_key(job_id)
  local key_id, slug, attempts, created, expires = unpack(redis.call('HMGET', job, 'key_id',
    'slug', 'attempts', 'created_at', 'expires_at'))
  local ttl = math.max(tonumber(expires) - tonumber(created), 0)
  local fields = {'job_id', job_id, 'key_id', key_id, 'slug', slug, 'type', event_type,
    'at', now_text, 'attempt', attempts or '0'}
  if error_kind then
    fields[#fields + 1] = 'error_kind'
    fields[#fields + 1] = error_kind
    fields[#fields + 1] = 'error'
    fields[#fields + 1] = message
  end
  local id = redis.call('XADD', events_key(), '*', unpack(fields))
  local own = job_events_key(job_id)
  redis.call('XADD', own, id, unpack(fields))
  redis.call('ZADD', events_trim_key(), string.format('%.6f', tonumber(now_text) + ttl),
    id .. ' ' .. job_id)
  -- The job's stream outlives the job hash (the purge's own event is written just before the
  -- hash goes) and each of its events' retention; purge trims it entry by entry.
  local keep_ms = math.max(math.ceil(ttl * 1000), redis.call('PTTL', job), redis.call('PTTL', own))
  redis.call('PEXPIRE', own, string.format('%.0f', math.max(keep_ms, 1)))
  history_follow(job_id, event_type, now_text, error_kind, message, charged)
  return id
end

-- A job leaves the queue: its entry is acknowledged and deleted, its indexes forget it.
local function leave_queue(slug, job_id, entry)
  if not slug then return end
  if entry then
    redis.call('XACK', queue_key(slug), GROUP, entry)
    redis.call('XDEL', queue_key(slug), entry)
  end
  redis.call('ZREM', leases_key(slug), job_id)
  redis.call('ZREM', requeued_key(slug), job_id)
end

local function refund(job)
  local cost = tonumber(redis.call('HGET', job, 'cost_micro')) or 0
  local key = api_key_key(redis.call('HGET', job, 'key_id') or '')
  if cost > 0 and redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'balance_micro', cost)
  end
end

-- A job that has not ended → FAILED, refunded (unless ``keep_charge``), announced; whoever
-- waits for it is woken.
local function fail_and_refund(job_id, kind, message, now, keep_charge)
  local job = job_key(job_id)
  local slug, entry = unpack(redis.call('HMGET', job, 'slug', 'entry'))
  redis.call('HSET', job, 'status', 'FAILED', 'error', message, 'error_kind', kind,
             'finished_at', now)
  redis.call('HDEL', job, 'lease_until')
  leave_queue(slug, job_id, entry)
  if not keep_charge then refund(job) end
  announce(job_id, EVENT_FAILED, now, kind, message, keep_charge)
  redis.call('PUBLISH', done_channel(), job_id)
end

local function clear_progress(job)
  redis.call('HDEL', job, 'progress_step', 'progress_total', 'progress_at')
end
