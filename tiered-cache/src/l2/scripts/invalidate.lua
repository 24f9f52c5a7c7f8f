-- Deletes one entry and advances its version counter, so that a load that
-- began before this (and saw the older version) cannot store its value.
-- KEYS[1] is the entry, KEYS[2] its counter (same hash slot); ARGV[1] the
-- counter's least time to live in ms. Returns the new version.
local seen = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local t = redis.call('TIME')
local version = math.max(seen + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('UNLINK', KEYS[1])
local keep = math.max(tonumber(ARGV[1]), redis.call('PTTL', KEYS[2]))
redis.call('SET', KEYS[2], string.format('%d', version), 'PX', keep)
return version
