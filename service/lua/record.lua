-- Record what one or more webhook requests produced, atomically: for each accepted event, set its
-- dedupe mark and append it to the events stream (or count it a duplicate); append every dead letter.
-- There is no moment at which a mark exists without its entry, or an entry without its mark.
--
-- KEYS[1]     the events stream (prefix:events)
-- KEYS[2]     the dead-letter stream (prefix:events:dead)
-- KEYS[3..]   one dedupe mark (prefix:seen:<event_id>) per event, in event order
-- ARGV[1]     dedupe mark TTL in seconds
-- ARGV[2]     dead-letter stream MAXLEN (approximate trimming)
-- ARGV[3]     number of events E
-- ARGV[4]     number of dead letters D
-- ARGV[5..]   E events then D dead letters, each as: field count N, then N name/value pairs
-- Returns:    {status of event 1, ..., status of event E, dead-letter stream length}
--             where a status is 1 (appended) or 0 (duplicate); the length is -1 when D is 0
local ttl = ARGV[1]
local maxlen = ARGV[2]
local n_events = tonumber(ARGV[3])
local n_dead = tonumber(ARGV[4])
local pos = 5
local result = {}

local function fields_at(p)
    local n = tonumber(ARGV[p])
    local f = {}
    for j = 1, 2 * n do
        f[j] = ARGV[p + j]
    end
    return f, p + 2 * n + 1
end

for i = 1, n_events do
    local f
    f, pos = fields_at(pos)
    if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', ttl) then
        redis.call('XADD', KEYS[1], '*', unpack(f))
        result[i] = 1
    else
        result[i] = 0
    end
end

local dead_len = -1
for _ = 1, n_dead do
    local f
    f, pos = fields_at(pos)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(f))
end
if n_dead > 0 then
    dead_len = redis.call('XLEN', KEYS[2])
end
result[n_events + 1] = dead_len
return result
