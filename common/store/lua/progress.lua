-- progress: record a running job's progress (and its newest preview), only while this attempt on this worker
-- still runs it (a late write from the background poller never touches a job that ended or moved on).
-- KEYS: task, events, log, preview
-- ARGV: attempt, worker, step, total, now, retention, preview (JSON: step, total, image, width, height; '' none),
--       preview step, loss (a training job's latest; '' none), loss curve (JSON [[step, loss], ...]; '' none)
-- Returns {1, eta in seconds ('' when not known yet)} if written, {0} otherwise.
-- include: lib
local task, events, log, preview = unpack(KEYS)
local now, retention = ARGV[5], ARGV[6]
local st, attempt, worker, since, from = unpack(redis.call('HMGET', task, 'status', 'attempt', 'worker',
                                                            'steps_since', 'steps_from'))
if st ~= 'processing' or attempt ~= ARGV[1] or worker ~= ARGV[2] then return {0} end
local step, total = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HSET', task, 'progress_step', ARGV[3], 'progress_total', ARGV[4], 'updated_at', now)
-- ETA from the pace since the first step this attempt reported (model loading is not a step).
local eta = ''
if not since or tonumber(from) > step then
  redis.call('HSET', task, 'steps_since', now, 'steps_from', ARGV[3])
elseif step > tonumber(from) and total >= step then
  eta = string.format('%.2f', (tonumber(now) - tonumber(since)) / (step - tonumber(from)) * (total - step))
end
if ARGV[9] ~= '' then
  redis.call('HSET', task, 'loss', ARGV[9])
  if ARGV[10] ~= '' then redis.call('HSET', task, 'loss_curve', ARGV[10]) end
  announce(events, log, retention, 'progress', 'step', ARGV[3], 'total', ARGV[4], 'eta', eta, 'at', now,
           'loss', ARGV[9])
else
  announce(events, log, retention, 'progress', 'step', ARGV[3], 'total', ARGV[4], 'eta', eta, 'at', now)
end
if ARGV[7] ~= '' then
  redis.call('SET', preview, ARGV[7], 'EX', retention)
  announce(events, log, retention, 'preview', 'step', ARGV[8], 'at', now)
end
return {1, eta}
