-- Replace one stored value only if it is still the value that was read (compare-and-set), so a key
-- rotation never overwrites a value another writer changed in the meantime.
--
-- KEYS[1]   a connection hash (prefix:connection:<realm_id>), the verifier-token index hash, or a
--           connection stored as a JSON string by another writer
-- ARGV[1]   the hash field (any name, "" included), ignored when KEYS[1] is a string
-- ARGV[2]   the value that was read
-- ARGV[3]   the new value
-- Returns:  1 when replaced, 0 when the stored value had changed (or is gone, or the key is of another type)
local kind = redis.call('TYPE', KEYS[1])['ok']
local current
if kind == 'string' then
    current = redis.call('GET', KEYS[1])
elseif kind == 'hash' then
    current = redis.call('HGET', KEYS[1], ARGV[1])
else
    return 0
end
if current ~= ARGV[2] then
    return 0
end
if kind == 'string' then
    redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
