-- Takes a fleet lock that is free or holds the marker ARGV[1] (a
-- `stored:<version>` left by the holder of an entry that this instance has
-- read since and cannot use: invalidated, expired, or of an older tag).
-- KEYS[1] is the lock, ARGV[2] the new holder's token, ARGV[3] the lease
-- in ms. Returns 1 when taken, 0 when another instance holds it now.
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
