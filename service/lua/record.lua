-- Record what one or more webhook requests produced, atomically: for each accepted event, set its
-- dedupe mark and append it to the events stream (or count it a duplicate); append every dead letter.
-- There is no moment at which a mark exists without its entry, or an entry without its mark.
--
-- KEYS[1]     the events stream (prefix:events)
-- KEYS[2]     the dead-letter stream (prefix:events:dead)
-- KEYS[3..]   one dedupe mark (prefix:seen:<event_id>) per event, in event order
-- ARGV[1]     dedupe mark TTL in seconds
-- ARGV[2]     dead-letter stream MAXLEN (approximate trimming)
-- ARGV[3]     JSON: {"names": [event field names but the last], "events": [[values in names order], ...],
--                    "letters": [[name, value, name, value, ...], ...]}
--             (one JSON argument for the short fields: packing thousands of arguments costs the client more)
-- ARGV[4]     the name of the last event field (the payload)
-- ARGV[4+i]   event i's payload: the largest value, an argument of its own so it is neither escaped
--             into the JSON nor decoded from it
-- Returns:    {status of event 1, ..., status of event E, dead-letter stream length}
--             where a status is 1 (appended) or 0 (duplicate); the length is -1 when there are no letters
local ttl = ARGV[1]
local maxlen = ARGV[2]
local batch = cjson.decode(ARGV[3])
local names = batch['names']
local width = #names
local result = {}

local fields = {}
for j, name in ipairs(names) do
    fields[2 * j - 1] = name
end
fields[2 * width + 1] = ARGV[4]
for i, values in ipairs(batch['events']) do
    if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', ttl) then
        for j = 1, width do
            fields[2 * j] = values[j]
        end
        fields[2 * width + 2] = ARGV[4 + i]
        redis.call('XADD', KEYS[1], '*', unpack(fields))
        result[i] = 1
    else
        result[i] = 0
    end
end

local dead_len = -1
local letters = batch['letters']
for _, letter in ipairs(letters) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(letter))
end
if #letters > 0 then
    dead_len = redis.call('XLEN', KEYS[2])
end
result[#result + 1] = dead_len
return result
