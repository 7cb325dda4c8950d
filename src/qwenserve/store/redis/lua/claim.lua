-- KEYS: (stream, leases, requeued) per slug
-- ARGV: prefix, worker id, now, lease_until, max_attempts, limit, give-up message template
local worker, now_text, lease_until = ARGV[2], ARGV[3], ARGV[4]
local now, max_attempts, limit = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slugs = #KEYS / 3
local claimed, taken = {}, {}

local function entry_of(job_id)
  return redis.call('HGET', job_key(job_id), 'entry') or '0-0'
end

-- Up to `want` candidates of each kind per slug, oldest entry first.
local function candidates(want)
  local found = {}
  for s = 1, slugs do
    local stream, leases, requeued = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
    local last = last_delivered(stream)
    if last then
      for _, e in ipairs(redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', want)) do
        found[#found + 1] = {kind = 'new', s = s, entry = e[1]}
      end
    end
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now_text, 'LIMIT', 0, want)) do
      if not taken[id] then
        found[#found + 1] = {kind = 'lease', s = s, id = id, entry = entry_of(id)}
      end
    end
    for _, id in ipairs(redis.call('ZRANGE', requeued, 0, want - 1)) do
      found[#found + 1] = {kind = 'requeued', s = s, id = id, entry = entry_of(id)}
    end
  end
  table.sort(found, function(a, b) return entry_before(a.entry, b.entry) end)
  return found
end

local function take(s, job_id)
  local job = job_key(job_id)
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'status', 'PROCESSING', 'worker_id', worker, 'lease_until', lease_until)
  redis.call('HSETNX', job, 'started_at', now_text)
  clear_progress(job)
  redis.call('ZADD', KEYS[3 * s - 1], lease_until, job_id)
  redis.call('ZREM', KEYS[3 * s], job_id)
  announce(job_id, EVENT_PROCESSING, now_text)
  claimed[#claimed + 1] = job_id
  taken[job_id] = true
end

local function take_new(c)
  local stream = KEYS[3 * c.s - 2]
  -- The group hands out entries in order, so this is c.entry.
  local reply = redis.call('XREADGROUP', 'GROUP', GROUP, worker, 'COUNT', 1, 'STREAMS', stream, '>')
  if not reply or not reply[1] or not reply[1][2][1] then return end
  local entry, fields = reply[1][2][1][1], reply[1][2][1][2]
  local job_id
  for i = 1, #fields, 2 do
    if fields[i] == 'job' then job_id = fields[i + 1] end
  end
  if job_id and redis.call('HGET', job_key(job_id), 'status') == 'QUEUED' then
    take(c.s, job_id)
  else
    -- The job expired (or was failed) under Redis's feet: drop its entry.
    redis.call('XACK', stream, GROUP, entry)
    redis.call('XDEL', stream, entry)
  end
end

local function take_expired(c)
  local job = job_key(c.id)
  local status, until_text, attempts, entry, cancel = unpack(redis.call('HMGET', job, 'status',
    'lease_until', 'attempts', 'entry', 'cancel_requested_at'))
  if status ~= 'PROCESSING' then
    redis.call('ZREM', KEYS[3 * c.s - 1], c.id)
    if not status then
      redis.call('XACK', KEYS[3 * c.s - 2], GROUP, c.entry)
      redis.call('XDEL', KEYS[3 * c.s - 2], c.entry)
    end
    return
  end
  if until_text and tonumber(until_text) > now then
    redis.call('ZADD', KEYS[3 * c.s - 1], until_text, c.id)  -- the index lagged the hash
    return
  end
  if cancel then
    -- Its owner asked to stop it and its worker is gone: it ends instead of running again.
    fail_and_refund(c.id, CANCELLED, CANCELLED_WORKER_LOST, now_text)
    return
  end
  attempts = tonumber(attempts) or 0
  if attempts >= max_attempts then
    fail_and_refund(c.id, GIVE_UP_KIND, string.format(ARGV[7], attempts, attempts), now_text)
    return
  end
  if entry then
    redis.call('XCLAIM', KEYS[3 * c.s - 2], GROUP, worker, 0, entry, 'JUSTID')
  end
  take(c.s, c.id)
end

local function take_requeued(c)
  redis.call('ZREM', KEYS[3 * c.s], c.id)
  local status, entry = unpack(redis.call('HMGET', job_key(c.id), 'status', 'entry'))
  if status ~= 'QUEUED' then return end
  if entry then
    redis.call('XCLAIM', KEYS[3 * c.s - 2], GROUP, worker, 0, entry, 'JUSTID')
  end
  take(c.s, c.id)
end

-- Each pass either claims or removes every candidate it handles, so the loop ends.
for _ = 1, 100 do
  if #claimed >= limit then break end
  local found = candidates(limit - #claimed)
  if #found == 0 then break end
  for _, c in ipairs(found) do
    if #claimed >= limit then break end
    if c.kind == 'new' then take_new(c)
    elseif c.kind == 'lease' then take_expired(c)
    else take_requeued(c) end
  end
end

local jobs = {}
for i, job_id in ipairs(claimed) do
  jobs[i] = redis.call('HGETALL', job_key(job_id))
end
return jobs
