-- update_pool: rewrite a recorded pool, only if it is still recorded (never resurrects a deleted one).
-- KEYS: pools
-- ARGV: pool name, record (JSON)
local pools = KEYS[1]
if redis.call('HEXISTS', pools, ARGV[1]) == 1 then redis.call('HSET', pools, ARGV[1], ARGV[2]) end
return 0
