-- KEYS: history expiry zset, usage expiry zset; ARGV: prefix, now, batch size
-- History records and usage counters whose time is up go (store/history.py). Returns how many.
local gone = 0
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0,
                                   ARGV[3])) do
  local hist = history_key(job_id)
  local key_id = redis.call('HGET', hist, 'key_id')
  if key_id then redis.call('ZREM', history_by_key_key(key_id), job_id) end
  redis.call('DEL', hist)
  redis.call('ZREM', KEYS[1], job_id)
  gone = gone + 1
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0,
                                   ARGV[3])) do
  local key_id, day = string.match(member, '^(.*) (%d+)$')
  if key_id then redis.call('DEL', usage_key(key_id, day)) end
  redis.call('ZREM', KEYS[2], member)
  gone = gone + 1
end
return gone
