-- Extends a fleet lock's lease only if this holder still has it: KEYS[1] is
-- the lock, ARGV[1] the holder's token, ARGV[2] the lease in ms. Returns 1
-- when renewed, 0 when the lock is gone or another instance's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
