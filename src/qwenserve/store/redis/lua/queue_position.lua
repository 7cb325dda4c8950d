-- How many QUEUED jobs of the same model a claim takes before this one.
-- KEYS: job hash; ARGV: prefix, now. Returns -1 when the job is not QUEUED (or expired).
local status, slug, entry, expires = unpack(redis.call('HMGET', KEYS[1], 'status', 'slug',
  'entry', 'expires_at'))
if status ~= 'QUEUED' or not entry or tonumber(expires) <= tonumber(ARGV[2]) then return -1 end
local stream = queue_key(slug)
local ahead = 0
-- New entries are handed out in stream order: those before it that the group has not handed
-- out yet. (When this job's own entry was handed out, it is a released job: none are before.)
local last = last_delivered(stream)
if last and entry_before(last, entry) then
  ahead = ahead + #redis.call('XRANGE', stream, '(' .. last, '(' .. entry)
end
-- Released jobs waiting again keep their original place.
for _, id in ipairs(redis.call('ZRANGE', requeued_key(slug), 0, -1)) do
  local other = redis.call('HGET', job_key(id), 'entry')
  if other and entry_before(other, entry) then ahead = ahead + 1 end
end
return ahead
