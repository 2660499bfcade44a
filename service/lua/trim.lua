-- Trim the events stream of the entries every consumer group has acknowledged (SPEC §5.5), atomically
-- with reading the groups' positions, so no group can move backwards in between. For each group the
-- first entry it still needs is its oldest pending entry, or (with nothing pending) the entry after its
-- last-delivered id; the stream is trimmed to the lowest of these (XTRIM MINID, Redis >= 6.2).
-- A stream without groups is not trimmed at all.
--
-- KEYS[1]     the events stream (prefix:events)
-- Returns:    {number of entries removed, the MINID used ('' when nothing was trimmed)}
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then
    return {0, ''}
end

-- Stream ids are <ms>-<seq>; both parts may exceed a double's exact range, so compare them as digit strings.
local function parts(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return ms, seq
end
local function less_digits(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a < b
end
local function less(a, b)
    local ams, aseq = parts(a)
    local bms, bseq = parts(b)
    if ams ~= bms then
        return less_digits(ams, bms)
    end
    return less_digits(aseq, bseq)
end
-- The id right after <ms>-<seq>: increment the decimal string of seq (carrying into ms at 2^64 is not needed:
-- Redis never issues seq 18446744073709551615 followed by another id in the same millisecond).
local function after(id)
    local ms, seq = parts(id)
    local digits = {}
    for i = 1, #seq do
        digits[i] = tonumber(string.sub(seq, i, i))
    end
    local i = #digits
    while i >= 1 and digits[i] == 9 do
        digits[i] = 0
        i = i - 1
    end
    if i == 0 then
        table.insert(digits, 1, 1)
    else
        digits[i] = digits[i] + 1
    end
    return ms .. '-' .. table.concat(digits)
end

local bound = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for i = 1, #info, 2 do
        if info[i] == 'name' then
            name = info[i + 1]
        elseif info[i] == 'last-delivered-id' then
            last = info[i + 1]
        end
    end
    local summary = redis.call('XPENDING', stream, name)
    local needed
    if tonumber(summary[1]) > 0 then
        needed = summary[2]
    else
        needed = after(last)
    end
    if bound == nil or less(needed, bound) then
        bound = needed
    end
end
if bound == nil then
    return {0, ''}
end
return {redis.call('XTRIM', stream, 'MINID', bound), bound}
