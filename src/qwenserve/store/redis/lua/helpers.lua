-- Shared by every job script (after the key builders and the constants, before the script).
-- Numbers that are stored (times, leases) are passed in as text from Python and stored as is:
-- Lua would print a double with 14 digits only.

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

-- Every event this script appended, in order, each as {id, field, value, ...}: what a
-- transition script returns, so its caller learns the events it made (store/base.py).
local announced = {}

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
  announced[#announced + 1] = {id, unpack(fields)}
  return id
end

local function fair_tag(key_id)
  return tonumber(redis.call('HGET', fair_tags_key(), key_id)) or 0
end

local function number_text(x) return string.format('%.17g', x) end

-- A job's projected start in the fair order (store/sqlite/fair_order.py says how and when it
-- drifts): max(its key's tag, the virtual time, the projected finish of the key's other QUEUED
-- jobs); the key's projected finish moves past it by service / weight.
local function fair_stamp(job_id, key_id)
  local job = job_key(job_id)
  local start = math.max(fair_tag(key_id), fair_tag(''))
  local others = redis.call('SCARD', key_queued_key(key_id))
    - redis.call('SISMEMBER', key_queued_key(key_id), job_id)
  if others > 0 then
    start = math.max(start, tonumber(redis.call('HGET', fair_proj_key(), key_id)) or 0)
  end
  local service = tonumber(redis.call('HGET', job, 'service')) or 1
  local weight = tonumber(redis.call('HGET', api_key_key(key_id), 'weight')) or 1
  redis.call('HSET', job, 'fair_start', number_text(start))
  redis.call('HSET', fair_proj_key(), key_id,
    number_text(start + service / math.max(weight, 1e-6)))
  return start
end

-- A job given back to the queue (release): its claim is undone in its key's service (the tag
-- moves back by service / weight: it is charged when claimed again, not twice), the key's
-- scores lowered to match, and it is stamped at its key's head, where it waits.
local function fair_unclaim(job_id)
  local job = job_key(job_id)
  local key_id, service = unpack(redis.call('HMGET', job, 'key_id', 'service'))
  if not key_id then return end
  local weight = tonumber(redis.call('HGET', api_key_key(key_id), 'weight')) or 1
  local tag = math.max(fair_tag(key_id) - (tonumber(service) or 1) / math.max(weight, 1e-6), 0)
  redis.call('HSET', fair_tags_key(), key_id, number_text(tag))
  for _, slug in ipairs(redis.call('SMEMBERS', slugs_key())) do
    local score = tonumber(redis.call('ZSCORE', fair_keys_key(slug), key_id))
    if score and score > tag then
      redis.call('ZADD', fair_keys_key(slug), number_text(tag), key_id)
    end
  end
  redis.call('HSET', job, 'fair_start', number_text(math.max(tag, fair_tag(''))))
end

-- A job waits (submitted, released): into its model's waiting set and its key's FIFO there;
-- a key not yet waiting for the model joins at max(its tag, the virtual time) (store/fair.py).
-- Its place in the fair order (for its queue position) is its projected start, stamped once:
-- a released job keeps it, back at its key's head.
local function fair_join(job_id)
  local slug, key_id, fifo, entry, fair_start = unpack(redis.call('HMGET', job_key(job_id),
    'slug', 'key_id', 'fifo', 'entry', 'fair_start'))
  fifo = tonumber(fifo) or 0
  redis.call('ZADD', waiting_key(slug), fifo, job_id)
  if entry then redis.call('HSET', entries_key(slug), job_id, entry) end
  redis.call('ZADD', fair_queue_key(slug, key_id), fifo, job_id)
  if not redis.call('ZSCORE', fair_keys_key(slug), key_id) then
    redis.call('ZADD', fair_keys_key(slug), number_text(math.max(fair_tag(key_id),
      fair_tag(''))), key_id)
  end
  fair_start = tonumber(fair_start) or fair_stamp(job_id, key_id)
  redis.call('ZADD', fair_order_key(slug), number_text(fair_start), key_id .. ' ' .. job_id)
end

-- A job stops waiting: its model's waiting set and its key's FIFO forget it; a key with no
-- job left there leaves the model's fair set.
local function fair_leave(slug, key_id, job_id)
  redis.call('ZREM', waiting_key(slug), job_id)
  redis.call('HDEL', entries_key(slug), job_id)
  if not key_id then return end
  redis.call('ZREM', fair_order_key(slug), key_id .. ' ' .. job_id)
  local fq = fair_queue_key(slug, key_id)
  redis.call('ZREM', fq, job_id)
  if redis.call('ZCARD', fq) == 0 then redis.call('ZREM', fair_keys_key(slug), key_id) end
end

-- A job leaves the queue: its entry is acknowledged and deleted, its indexes forget it.
local function leave_queue(slug, job_id, entry)
  if not slug then return end
  if entry then
    redis.call('XACK', queue_key(slug), GROUP, entry)
    redis.call('XDEL', queue_key(slug), entry)
  end
  redis.call('ZREM', leases_key(slug), job_id)
  local key_id = redis.call('HGET', job_key(job_id), 'key_id')
  if key_id then redis.call('SREM', running_key(key_id), job_id) end
  fair_leave(slug, key_id, job_id)
end

local function refund(job)
  local cost = tonumber(redis.call('HGET', job, 'cost_micro')) or 0
  local key = api_key_key(redis.call('HGET', job, 'key_id') or '')
  if cost > 0 and redis.call('EXISTS', key) == 1 then
    redis.call('HINCRBY', key, 'balance_micro', cost)
  end
end

-- A job stops waiting (claimed, ended, purged): the queue-limit sets and the start deadlines
-- forget it (no-ops for a job that was not in them).
local function left_queued(job_id, key_id)
  redis.call('SREM', queued_key(), job_id)
  if key_id then redis.call('SREM', key_queued_key(key_id), job_id) end
  redis.call('ZREM', start_by_key(), job_id)
end

-- A job waits (submitted, released): it counts against the queue limits, and its start
-- deadline holds while it never started.
local function joined_queued(job_id)
  local key_id, start_by, started = unpack(redis.call('HMGET', job_key(job_id), 'key_id',
    'start_by', 'started_at'))
  redis.call('SADD', queued_key(), job_id)
  redis.call('SADD', key_queued_key(key_id), job_id)
  if start_by and start_by ~= '' and not started then
    redis.call('ZADD', start_by_key(), start_by, job_id)
  end
end

-- A job that has not ended → FAILED, refunded (unless ``keep_charge``), announced; whoever
-- waits for it is woken.
local function fail_and_refund(job_id, kind, message, now, keep_charge)
  local job = job_key(job_id)
  local slug, entry, key_id = unpack(redis.call('HMGET', job, 'slug', 'entry', 'key_id'))
  redis.call('HSET', job, 'status', 'FAILED', 'error', message, 'error_kind', kind,
             'finished_at', now)
  redis.call('HDEL', job, 'lease_until')
  leave_queue(slug, job_id, entry)
  left_queued(job_id, key_id)
  if not keep_charge then
    refund(job)
    -- The job's cost is what its key is charged now (a refunded failure: 0, as its history).
    redis.call('HSET', job, 'cost_micro', '0')
  end
  announce(job_id, EVENT_FAILED, now, kind, message, keep_charge)
  redis.call('PUBLISH', done_channel(), job_id)
end

local function clear_progress(job)
  redis.call('HDEL', job, 'progress_step', 'progress_total', 'progress_at')
end

-- QUEUED jobs that never started and whose start deadline has passed end FAILED
-- (start_timeout), refunded and announced: the first `batch` by deadline. Returns how many
-- deadlines it handled (ended, or dropped for a job that had moved on).
local function end_missed_starts(now_text, batch)
  local due = redis.call('ZRANGEBYSCORE', start_by_key(), '-inf', now_text, 'LIMIT', 0, batch)
  for _, job_id in ipairs(due) do
    local status, started = unpack(redis.call('HMGET', job_key(job_id), 'status', 'started_at'))
    if status == 'QUEUED' and not started then
      fail_and_refund(job_id, START_TIMEOUT_KIND, START_TIMEOUT_MESSAGE, now_text)
    else
      redis.call('ZREM', start_by_key(), job_id)
    end
  end
  return #due
end
