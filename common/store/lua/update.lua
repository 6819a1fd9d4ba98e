-- update: write side fields (progress, webhook state) only while the task still exists.
-- KEYS: task
-- ARGV: field/value pairs...
-- Returns 1 if written, 0 if the task is gone (never resurrected as a partial hash).
local task = KEYS[1]
if redis.call('EXISTS', task) == 0 then return 0 end
redis.call('HSET', task, unpack(ARGV))
return 1
