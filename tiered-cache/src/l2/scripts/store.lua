-- Compare-and-set write of one entry. KEYS[1] is the entry, KEYS[2] its
-- version counter, and KEYS[3], for a load that holds the entry's fleet
-- lock, that lock (all in one hash slot). ARGV[1] is the envelope, ARGV[2]
-- its time to live in ms, ARGV[3] the counter's least time to live in ms,
-- ARGV[4] the version the writer saw before it loaded (empty: write
-- whatever is there), ARGV[5] the byte offset of the version in the
-- envelope, ARGV[6] the lock holder's token (with KEYS[3]; empty without),
-- ARGV[7] the backplane channel on which to announce the write (empty: do
-- not announce) and ARGV[8] that message. The positions are fixed.
--
-- The new version is max(counter + 1, server time in µs): it only grows,
-- and stays above every earlier version even if the counter was lost. It
-- is written into the envelope, so readers see the version of what they
-- read. Everything is checked before the first write (scripts do not roll
-- back): SET's GET fails with WRONGTYPE, writing nothing, when the entry's
-- key holds another Redis type. A held lock is released in the same step:
-- it becomes a marker `stored:<version>` for the rest of its lease, so an
-- instance that missed the entry just before this write and asks for the
-- lock just after learns that the value is there instead of loading it
-- again (`lock.rs`). A write that happened is then announced with PUBLISH,
-- so other instances hear of it before the writer's call returns. The
-- PUBLISH runs under pcall: refused (an ACL without the channel), it must
-- not fail a script whose SETs already ran; the caller announces instead.
-- Returns {new version, 1 if announced else 0}, or {0, 0} when a newer
-- write won (nothing written, nothing announced).
local counter = redis.call('GET', KEYS[2])
local seen = tonumber(counter or '0') or 0
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= seen then return {0, 0} end
local at = tonumber(ARGV[5])
local envelope = ARGV[1]
if #envelope < at + 8 then return redis.error_reply('ERR tiered-cache: envelope too short') end
local t = redis.call('TIME')
local version = math.max(seen + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
envelope = string.sub(envelope, 1, at) .. struct.pack('<I8', version) .. string.sub(envelope, at + 9)
redis.call('SET', KEYS[1], envelope, 'PX', ARGV[2], 'GET')
local keep = tonumber(ARGV[3])
if counter then keep = math.max(keep, redis.call('PTTL', KEYS[2])) end
redis.call('SET', KEYS[2], string.format('%d', version), 'PX', keep)
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[6] then
  redis.call('SET', KEYS[3], 'stored:' .. string.format('%d', version), 'KEEPTTL')
end
local announced = 0
if ARGV[7] ~= '' and pcall(redis.call, 'PUBLISH', ARGV[7], ARGV[8]) then
  announced = 1
end
return {version, announced}
