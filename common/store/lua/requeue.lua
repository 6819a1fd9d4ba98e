-- requeue: take a job from a dead, hung or forgetful worker and put its next attempt first in its priority class.
-- KEYS: task, running, broker_list, pending, pending_model (or ''), pending_owner (or ''), stats, events, outbox, registry,
--   log, preview
-- ARGV: id, worker, attempt, now, max attempts, retention, message, front score of its priority class,
--       give-up error ('' to requeue; else the job is failed with it: it ran past its time limit)
-- Returns {'requeued', next attempt}, {'failed'} (it killed max attempts workers, or it is given up),
-- {'cancelled'} (the client cancelled it while it ran) or {'taken'} (not that worker's attempt any more:
-- another reaper was first, or the job ended meanwhile).
-- include: lib
local task, running, broker_list, pending, pending_model, pending_owner, stats, events, outbox, registry, log,
      preview = unpack(KEYS)
local id, now, retention = ARGV[1], ARGV[4], ARGV[6]
local st, worker, attempt, cancel = unpack(redis.call('HMGET', task, 'status', 'worker', 'attempt', 'cancel_requested'))
if st ~= 'processing' or worker ~= ARGV[2] or attempt ~= ARGV[3] then return {'taken'} end
redis.call('ZREM', running, id)
if cancel == '1' then
  redis.call('HSET', task, 'error', 'cancelled by client')
  conclude(task, id, 'cancelled', now, retention, running, stats, events, outbox, log, preview)
  return {'cancelled'}
end
if ARGV[9] and ARGV[9] ~= '' then
  redis.call('HSET', task, 'error', ARGV[9])
  conclude(task, id, 'failed', now, retention, running, stats, events, outbox, log, preview)
  return {'failed'}
end
if tonumber(ARGV[3]) + 1 >= tonumber(ARGV[5]) then
  redis.call('HSET', task, 'error', 'the worker running this job died ' .. ARGV[5] .. ' times; giving up')
  conclude(task, id, 'failed', now, retention, running, stats, events, outbox, log, preview)
  return {'failed'}
end
local nxt = redis.call('HINCRBY', task, 'attempt', 1)
redis.call('HSET', task, 'worker', '', 'requeued_at', now, 'updated_at', now)
index(id, ARGV[8], now, retention, pending, opt(pending_model), opt(pending_owner), registry)
redis.call('HINCRBY', stats, 'requeued', 1)
redis.call('DEL', preview)
announce(events, log, retention, 'queued', 'attempt', tostring(nxt), 'requeued', '1', 'at', now)
redis.call('RPUSH', broker_list, ARGV[7])  -- consumers BRPOP: a delivery for it comes next
return {'requeued', nxt}
