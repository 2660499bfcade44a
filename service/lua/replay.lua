-- Replay one dead letter: append an entry to the events stream and delete the letter, in one step.
-- With a dedupe mark key the entry goes through the normal dedupe (SET NX + XADD, as record.lua);
-- without one it is appended unconditionally. A letter already gone (replayed or purged by someone
-- else) appends nothing, so replaying twice queues once.
--
-- KEYS[1]     the events stream (prefix:events)
-- KEYS[2]     the dead-letter stream (prefix:events:dead)
-- KEYS[3]     optional: the dedupe mark (prefix:seen:<event_id>)
-- ARGV[1]     the dead letter's entry id
-- ARGV[2]     dedupe mark TTL in seconds (unused without KEYS[3])
-- ARGV[3..]   the events-stream entry's fields as name/value pairs
-- Returns:    {status, new entry id}: status 'queued' (appended), 'duplicate' (the mark existed; the
--             letter is deleted, its event is already queued) or 'gone' (no such letter); the id is ''
--             unless queued
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then
    return {'gone', ''}
end
local entry = {}
for i = 3, #ARGV do
    entry[#entry + 1] = ARGV[i]
end
local status, id = 'duplicate', ''
if #KEYS < 3 or redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) then
    id = redis.call('XADD', KEYS[1], '*', unpack(entry))
    status = 'queued'
end
redis.call('XDEL', KEYS[2], ARGV[1])
return {status, id}
