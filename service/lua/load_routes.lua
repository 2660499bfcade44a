-- Read the routing fields of several realms' connection metadata in one round trip.
-- Connections are hashes (our writer) or JSON strings (other writers): both are read here.
--
-- KEYS: the connection keys, one per realm (prefix:connection:<realm_id>)
-- ARGV: none
-- Returns: one array per key, in KEYS order:
--   {'hash', webhook_verifier_token or false, environment or false}
--   {'string', the stored JSON text}
--   {'none'} when the key is missing or of another type
local out = {}
for i, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'hash' then
        local values = redis.call('HMGET', key, 'webhook_verifier_token', 'environment')
        out[i] = {'hash', values[1], values[2]}
    elseif kind == 'string' then
        out[i] = {'string', redis.call('GET', key)}
    else
        out[i] = {'none'}
    end
end
return out
