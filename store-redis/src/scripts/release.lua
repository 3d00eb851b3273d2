-- release (`reservation::release`): ARGV = prefix, now_ms, reservation key, id.
-- Returns {'ok', record} or {'refused', {reason}}.
local now, key, id = ARGV[2], ARGV[3], ARGV[4]
sweep(now)
local rkey = P .. 'r:' .. key
local r = load(rkey)
if not r or r.id ~= id then return {'refused', {'not_found'}} end

local state = state_at(r, now)
if state == 'committed' then return {'refused', {'committed'}} end
if state == 'released' then return {'ok', redis.call('HGETALL', rkey)} end
free(rkey, r)
if state == 'expired' then r.state = 'expired' else r.state = 'released' end
save(rkey, r)
redis.call('ZREM', P .. 'exp', key)
return {'ok', redis.call('HGETALL', rkey)}
