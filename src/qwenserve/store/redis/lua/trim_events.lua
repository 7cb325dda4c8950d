-- Trim the event log: events past their retention, oldest first, up to a batch.
-- KEYS: none; ARGV: prefix, now, batch size. Returns how many were trimmed.
-- The log is in id order and every event is kept one result TTL from when it happened, so the
-- expired ones are at its head; the scan stops at the first event still kept.
local now, batch = tonumber(ARGV[2]), tonumber(ARGV[3])
local trimmed = 0
for _, e in ipairs(redis.call('XRANGE', events_key(), '-', '+', 'COUNT', batch)) do
  local job_id, expires
  for i = 1, #e[2], 2 do
    if e[2][i] == 'job_id' then job_id = e[2][i + 1] end
    if e[2][i] == 'expires_at' then expires = tonumber(e[2][i + 1]) end
  end
  if expires and expires > now then break end
  redis.call('XDEL', events_key(), e[1])
  if job_id then redis.call('XDEL', job_events_key(job_id), e[1]) end
  trimmed = trimmed + 1
end
return trimmed
