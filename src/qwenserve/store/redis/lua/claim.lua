-- KEYS: (stream, leases) per slug
-- ARGV: prefix, worker id, now, lease_until, max_attempts, limit, give-up message template,
--       the slugs (in KEYS' order)
-- Returns {the claimed jobs' hash fields, every event appended (claims and endings)}.
-- Jobs whose lease ran out go first (their share was granted when first taken), oldest first;
-- then weighted fair queuing (store/fair.py): the waiting key with the least tag among the
-- models asked for (a fairkeys:<slug> head each, O(log K)), its oldest job (a fairq head).
local worker, now_text, lease_until = ARGV[2], ARGV[3], ARGV[4]
local now, max_attempts, limit = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slugs = #KEYS / 2
local claimed = {}
end_missed_starts(now_text, tonumber(START_TIMEOUT_BATCH))

local function take(s, job_id)
  local job = job_key(job_id)
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'status', 'PROCESSING', 'worker_id', worker, 'lease_until', lease_until)
  redis.call('HSETNX', job, 'started_at', now_text)
  clear_progress(job)
  redis.call('ZADD', KEYS[2 * s], lease_until, job_id)
  local key_id, entry = unpack(redis.call('HMGET', job, 'key_id', 'entry'))
  if entry then redis.call('XCLAIM', KEYS[2 * s - 1], GROUP, worker, 0, entry, 'JUSTID') end
  left_queued(job_id, key_id)
  fair_leave(ARGV[7 + s], key_id, job_id)
  if key_id then redis.call('SADD', running_key(key_id), job_id) end
  announce(job_id, EVENT_PROCESSING, now_text)
  claimed[#claimed + 1] = job_id
end

local function take_expired(s, job_id)
  local job = job_key(job_id)
  local status, until_text, attempts, entry, cancel = unpack(redis.call('HMGET', job, 'status',
    'lease_until', 'attempts', 'entry', 'cancel_requested_at'))
  if status ~= 'PROCESSING' then
    redis.call('ZREM', KEYS[2 * s], job_id)
    if not status and entry then redis.call('XDEL', KEYS[2 * s - 1], entry) end
    return
  end
  if until_text and tonumber(until_text) > now then
    redis.call('ZADD', KEYS[2 * s], until_text, job_id)  -- the index lagged the hash
    return
  end
  if cancel then
    -- Its owner asked to stop it and its worker is gone: it ends instead of running again.
    fail_and_refund(job_id, CANCELLED, CANCELLED_WORKER_LOST, now_text)
    return
  end
  attempts = tonumber(attempts) or 0
  if attempts >= max_attempts then
    fail_and_refund(job_id, GIVE_UP_KIND, string.format(ARGV[7], attempts, attempts), now_text)
    return
  end
  take(s, job_id)
end

-- Expired leases: each pass claims or removes every one it reads, so the loop ends.
for _ = 1, 100 do
  if #claimed >= limit then break end
  local found = {}
  for s = 1, slugs do
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2 * s], '-inf', now_text, 'LIMIT', 0,
        limit - #claimed)) do
      found[#found + 1] = {s = s, id = id,
        fifo = tonumber(redis.call('HGET', job_key(id), 'fifo')) or 0}
    end
  end
  if #found == 0 then break end
  table.sort(found, function(a, b) return a.fifo < b.fifo end)
  for _, c in ipairs(found) do
    if #claimed >= limit then break end
    take_expired(c.s, c.id)
  end
end

-- Keys at their max_running are passed over (checked once per key per claim: a take below
-- updates its count, so it is checked again after one).
local function under_cap(key_id)
  local cap = tonumber(redis.call('HGET', api_key_key(key_id), 'max_running')) or 0
  return cap <= 0 or redis.call('SCARD', running_key(key_id)) < cap
end

-- The least-tag key under its cap waiting for the slug: (key, its tag) or nil. A score below
-- the key's tag is stale (it was served for another model since): raised, then looked again.
local function head_of(slug)
  local fk = fair_keys_key(slug)
  local offset = 0
  for _ = 1, 100000 do
    local top = redis.call('ZRANGE', fk, offset, offset, 'WITHSCORES')
    if not top[1] then return nil end
    local key_id, score = top[1], tonumber(top[2])
    local tag = fair_tag(key_id)
    if score < tag then
      redis.call('ZADD', fk, number_text(tag), key_id)
    elseif under_cap(key_id) then
      return key_id, score
    else
      offset = offset + 1
    end
  end
  return nil
end

for _ = 1, limit * 4 + 100 do
  if #claimed >= limit then break end
  local best_s, best_key, best_tag
  for s = 1, slugs do
    local key_id, tag = head_of(ARGV[7 + s])
    if key_id and (not best_key or tag < best_tag or (tag == best_tag and key_id < best_key)) then
      best_s, best_key, best_tag = s, key_id, tag
    end
  end
  if not best_key then break end
  local slug = ARGV[7 + best_s]
  local job_id = redis.call('ZRANGE', fair_queue_key(slug, best_key), 0, 0)[1]
  if not job_id then
    redis.call('ZREM', fair_keys_key(slug), best_key)
  elseif redis.call('HGET', job_key(job_id), 'status') ~= 'QUEUED' then
    -- The job expired under Redis's feet: the queue forgets it, its stream entry too.
    local entry = redis.call('HGET', entries_key(slug), job_id)
    if entry then
      redis.call('XACK', KEYS[2 * best_s - 1], GROUP, entry)
      redis.call('XDEL', KEYS[2 * best_s - 1], entry)
    end
    fair_leave(slug, best_key, job_id)
    left_queued(job_id, best_key)
  else
    local service = tonumber(redis.call('HGET', job_key(job_id), 'service')) or 1
    local weight = tonumber(redis.call('HGET', api_key_key(best_key), 'weight')) or 1
    local start = math.max(best_tag, fair_tag(best_key), fair_tag(''))
    local tag = start + service / math.max(weight, 1e-6)
    redis.call('HSET', fair_tags_key(), best_key, number_text(tag), '', number_text(start))
    take(best_s, job_id)
    if redis.call('ZSCORE', fair_keys_key(slug), best_key) then
      redis.call('ZADD', fair_keys_key(slug), number_text(tag), best_key)
    end
  end
end

local jobs = {}
for i, job_id in ipairs(claimed) do
  jobs[i] = redis.call('HGETALL', job_key(job_id))
end
return {jobs, announced}
