-- Reclaim a consumer group's entries that have been pending longer than an idle time (a dead or stuck
-- consumer's), for one consumer, and return them with their delivery counts. Works alike on Redis 6.2
-- (where XAUTOCLAIM returns deleted entries as nil) and 7.x: ids are claimed with JUSTID, entries that
-- no longer exist in the stream are acknowledged (nothing is left to deliver), and each claimed entry's
-- delivery count is raised by one, as a plain XAUTOCLAIM would.
--
-- KEYS[1]     the events stream (prefix:events)
-- ARGV[1]     consumer group
-- ARGV[2]     consumer name (the new owner)
-- ARGV[3]     minimum idle time in milliseconds
-- ARGV[4]     scan cursor (an entry id; 0-0 to start)
-- ARGV[5]     maximum number of entries to claim
-- Returns:    {next cursor, {{entry id, delivery count, {field, value, ...}}, ...}, deleted entries acknowledged}
--             the next cursor is 0-0 when the scan of the pending list is complete
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local claimed = {}
local deleted = 0
for _, id in ipairs(reply[2]) do
    local entry = redis.call('XRANGE', stream, id, id)
    if #entry == 0 then
        redis.call('XACK', stream, group, id)
        deleted = deleted + 1
    else
        local pending = redis.call('XPENDING', stream, group, id, id, 1)
        local count = tonumber(pending[1][4]) + 1
        redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', count, 'JUSTID')
        claimed[#claimed + 1] = {id, count, entry[1][2]}
    end
end
return {reply[1], claimed, deleted}
