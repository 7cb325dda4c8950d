-- KEYS: workers hash, lapse zset; ARGV: prefix, worker id, info JSON, lapses_at, now
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
-- Forget workers that stopped announcing (killed) so the hash does not grow forever.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])) do
  redis.call('HDEL', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
return 1
