-- How many QUEUED jobs of the same model the fair claim takes before this one: its rank in
-- the model's fair order (by projected start, then key id: the claim's own tie rule; see
-- store/sqlite/fair_order.py). A job queued before the fair order was kept falls back to its
-- submit order. KEYS: job hash; ARGV: prefix, now, job id. Returns -1 when the job is not
-- QUEUED (or expired).
local status, slug, fifo, expires, key_id = unpack(redis.call('HMGET', KEYS[1], 'status',
  'slug', 'fifo', 'expires_at', 'key_id'))
if status ~= 'QUEUED' or not fifo or tonumber(expires) <= tonumber(ARGV[2]) then return -1 end
local rank = key_id and redis.call('ZRANK', fair_order_key(slug), key_id .. ' ' .. ARGV[3])
if rank then return rank end
return redis.call('ZCOUNT', waiting_key(slug), '-inf', '(' .. fifo)
