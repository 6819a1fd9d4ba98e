-- cancel: a waiting (or requeued) task is cancelled at once; a running one is flagged and stops at its next step.
-- KEYS: task, running, pending, pending_model (or ''), pending_owner (or ''), stats, events, outbox, log,
--   preview
-- ARGV: id, now, retention
-- Returns 'missing', 'cancelled', 'cancelling', or the status the task already had.
-- include: lib
local task, running, pending, pending_model, pending_owner, stats, events, outbox, log, preview = unpack(KEYS)
local id, now, retention = ARGV[1], ARGV[2], ARGV[3]
local st, holder = unpack(redis.call('HMGET', task, 'status', 'worker'))
if not st then return 'missing' end
if st == 'pending' or (st == 'processing' and (not holder or holder == '')) then   -- waiting, or requeued
  redis.call('HSET', task, 'error', 'cancelled by client')
  unindex(id, pending, opt(pending_model), opt(pending_owner))
  conclude(task, id, 'cancelled', now, retention, running, stats, events, outbox, log, preview)
  return 'cancelled'
end
if st == 'processing' then
  redis.call('HSET', task, 'cancel_requested', '1', 'updated_at', now)
  return 'cancelling'
end
return st
