-- Move a consumer group's pending entry to the dead-letter stream: append the letter and acknowledge
-- the entry in one step, so an entry is never both acknowledged and missing from the dead letters, nor
-- dead-lettered twice. Nothing happens unless the entry is still pending for this consumer (another
-- consumer may have reclaimed it, or it was acknowledged meanwhile).
--
-- KEYS[1]     the events stream (prefix:events)
-- KEYS[2]     the dead-letter stream (prefix:events:dead)
-- ARGV[1]     consumer group
-- ARGV[2]     consumer name that must own the pending entry
-- ARGV[3]     entry id in the events stream
-- ARGV[4]     dead-letter stream MAXLEN (approximate trimming)
-- ARGV[5..]   the letter's fields as name/value pairs
-- Returns:    the dead letter's entry id, or false when the entry was not pending for this consumer
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
    return false
end
local letter = {}
for i = 5, #ARGV do
    letter[#letter + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(letter))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return id
