-- KEYS: job hash; ARGV: prefix, job id, worker id ('' for any), kind, message, now,
--       refund ('1', or '0': the failure keeps its charge)
-- Returns the events appended (none: not applied).
local status, owner = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker_id'))
if status ~= 'QUEUED' and status ~= 'PROCESSING' then return announced end
if ARGV[3] ~= '' and (status ~= 'PROCESSING' or owner ~= ARGV[3]) then return announced end
fail_and_refund(ARGV[2], ARGV[4], ARGV[5], ARGV[6], ARGV[7] == '0')
return announced
