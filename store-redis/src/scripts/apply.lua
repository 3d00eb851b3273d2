-- apply: ARGV = prefix, source, expected marker or '', new marker, kept after
-- counted (ms), n counts, n x (counter, delta, keep_until), settle keys...
-- Returns {'done', '', used...} (each count's counter's used amount after it,
-- as text: a Lua number would round past 2^53) or {'stale', current marker
-- or ''}: a stale call changes nothing and reports no amounts.
local source, expected, marker, keep_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local current = redis.call('HGET', P .. 'applied', source)
if (current or '') ~= expected then return {'stale', current or ''} end

local used = {'done', ''}
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  local key = P .. 'u:' .. ARGV[i]
  redis.call('INCRBY', key, ARGV[i + 1])
  redis.call('EXPIREAT', key, ARGV[i + 2])
  used[#used + 1] = redis.call('GET', key)
  i = i + 3
end

-- `reservation::counted`: the event now counts in `u:`, so its holds go.
for j = i, #ARGV do
  local key = ARGV[j]
  local rkey = P .. 'r:' .. key
  local r = load(rkey)
  if r then
    free(rkey, r)
    r.counted = '1'
    if r.state == 'held' or r.state == 'expired' then r.state = 'committed' end
    save(rkey, r)
    redis.call('ZREM', P .. 'exp', key)
    redis.call('PEXPIRE', rkey, keep_ms)
    if r.idem then redis.call('PEXPIRE', P .. 'idem:' .. r.idem, keep_ms) end
  end
end

redis.call('HSET', P .. 'applied', source, marker)
return used
