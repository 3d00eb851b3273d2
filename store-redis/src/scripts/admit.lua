-- admit: ARGV = prefix, now_ms, reservation key, idempotency key or '',
-- id, created_at_ms, expires_at_ms, record kept until (ms), n checks,
-- n x (counter, amount, limit, hard 1/0), n holds, n x (counter, amount, keep_until).
-- Returns {decision, balances (used, held per check), indexes refused | record}.
local now, key, idem = ARGV[2], ARGV[3], ARGV[4]
sweep(now)

local checks, i = {}, 10
for _ = 1, tonumber(ARGV[9]) do
  checks[#checks + 1] = {counter = ARGV[i], amount = ARGV[i + 1], limit = ARGV[i + 2], hard = ARGV[i + 3] == '1'}
  i = i + 4
end
local holds = read_holds(i + 1, tonumber(ARGV[i]))

local function balances()
  local out = {}
  for _, c in ipairs(checks) do
    out[#out + 1] = redis.call('GET', P .. 'u:' .. c.counter) or '0'
    out[#out + 1] = redis.call('GET', P .. 'h:' .. c.counter) or '0'
  end
  return out
end

local ikey = P .. 'idem:' .. idem
if idem ~= '' then
  local existing = redis.call('GET', ikey)
  if existing then
    local record = redis.call('HGETALL', P .. 'r:' .. existing)
    -- An index outliving its record (it should not) admits anew.
    if #record > 0 then return {'existing', balances(), record} end
  end
end

local refused = {}
for n, c in ipairs(checks) do
  if c.hard then
    local used = redis.call('GET', P .. 'u:' .. c.counter)
    local held = redis.call('GET', P .. 'h:' .. c.counter)
    if not admits(used or nil, held or nil, c.amount, c.limit) then refused[#refused + 1] = tostring(n - 1) end
  end
end
if #refused > 0 then return {'denied', balances(), refused} end

local rkey = P .. 'r:' .. key
redis.call('HSET', rkey, 'id', ARGV[5], 'state', 'held', 'created_at_ms', ARGV[6], 'expires_at_ms', ARGV[7],
  'counted', '0', 'holds', format_holds(holds))
redis.call('PEXPIREAT', rkey, ARGV[8])
hold(holds)
redis.call('ZADD', P .. 'exp', ARGV[7], key)
if idem ~= '' then
  redis.call('HSET', rkey, 'idem', idem)
  redis.call('SET', ikey, key, 'PXAT', ARGV[8])
end
return {'new', balances(), {}}
