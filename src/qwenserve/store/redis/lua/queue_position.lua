-- How many QUEUED jobs of the same model were submitted before this one (submit order).
-- KEYS: job hash; ARGV: prefix, now. Returns -1 when the job is not QUEUED (or expired).
local status, slug, fifo, expires = unpack(redis.call('HMGET', KEYS[1], 'status', 'slug',
  'fifo', 'expires_at'))
if status ~= 'QUEUED' or not fifo or tonumber(expires) <= tonumber(ARGV[2]) then return -1 end
return redis.call('ZCOUNT', waiting_key(slug), '-inf', '(' .. fifo)
