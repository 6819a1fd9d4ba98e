-- progress: record a running job's progress, only while this attempt on this worker still runs it
-- (a late write from the background poller never touches a job that ended or moved on).
-- KEYS: task
-- ARGV: attempt, worker, step, total, now
-- Returns 1 if written, 0 otherwise.
local task = KEYS[1]
local st, attempt, worker = unpack(redis.call('HMGET', task, 'status', 'attempt', 'worker'))
if st ~= 'processing' or attempt ~= ARGV[1] or worker ~= ARGV[2] then return 0 end
redis.call('HSET', task, 'progress_step', ARGV[3], 'progress_total', ARGV[4], 'updated_at', ARGV[5])
return 1
