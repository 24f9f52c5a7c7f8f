-- Sets a tag's version to max(previous + 1, server time in µs), so that a
-- lost counter (restart, FLUSHALL, eviction) never goes back to an old value.
-- One key, so it runs unchanged in Redis Cluster; TIME is allowed in scripts
-- since Redis 5 (effects replication).
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if now > cur + 1 then return redis.call('INCRBY', KEYS[1], now - cur) end
return redis.call('INCR', KEYS[1])
