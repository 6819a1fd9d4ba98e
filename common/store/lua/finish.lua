-- finish: move a task this delivery holds to a terminal status, with its result fields.
-- KEYS: task, running, stats, events, outbox, log, preview
-- ARGV: attempt, worker, now, status, retention, id, field/value pairs...
-- Returns 1 (done now, or already by this delivery: a retry after a lost reply) or 0 (not ours any more).
-- include: lib
local task, running, stats, events, outbox, log, preview = unpack(KEYS)
local st, attempt, worker = unpack(redis.call('HMGET', task, 'status', 'attempt', 'worker'))
if attempt ~= ARGV[1] or worker ~= ARGV[2] then return 0 end
if st == ARGV[4] then return 1 end
if st ~= 'processing' then return 0 end
for i = 7, #ARGV, 2 do redis.call('HSET', task, ARGV[i], ARGV[i + 1]) end
conclude(task, ARGV[6], ARGV[4], ARGV[3], ARGV[5], running, stats, events, outbox, log, preview)
return 1
