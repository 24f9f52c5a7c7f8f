-- Releases a fleet lock only if this holder still has it: KEYS[1] is the
-- lock (in the entry's hash slot), ARGV[1] the holder's token. A holder
-- whose lease ran out, and whose lock another instance now holds, deletes
-- nothing. Returns 1 when released, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
