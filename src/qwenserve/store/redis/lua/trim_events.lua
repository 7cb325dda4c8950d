-- Trim the event log: events past their retention (their job's result TTL after they
-- happened), up to a batch, from the log and from their job's own stream.
-- KEYS: none; ARGV: prefix, now, batch size. Returns how many were trimmed.
local due = redis.call('ZRANGEBYSCORE', events_trim_key(), '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do
  local id, job_id = string.match(member, '^(%S+) (.*)$')
  redis.call('XDEL', events_key(), id)
  redis.call('XDEL', job_events_key(job_id), id)
  redis.call('ZREM', events_trim_key(), member)
end
return #due
