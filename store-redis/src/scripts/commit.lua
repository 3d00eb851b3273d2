-- commit (`reservation::commit`): ARGV = prefix, now_ms, reservation key, id,
-- fingerprint, n holds, n x (counter, amount, keep_until), then the counters
-- whose balances the answer carries (the commit's statuses: read here, in
-- the same step, rather than by a second call).
-- Returns {'ok', record, balances (used, held per counter)} or {'refused', {reason}, {}}.
local now, key, id, fp = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
sweep(now)
local rkey = P .. 'r:' .. key
local holds, after = read_holds(7, tonumber(ARGV[6]))

local function balances()
  local out = {}
  for i = after, #ARGV do
    out[#out + 1] = redis.call('GET', P .. 'u:' .. ARGV[i]) or '0'
    out[#out + 1] = redis.call('GET', P .. 'h:' .. ARGV[i]) or '0'
  end
  return out
end

local r = load(rkey)
if not r or r.id ~= id then return {'refused', {'not_found'}, {}} end

local state = state_at(r, now)
if state == 'released' then return {'refused', {'released'}, {}} end
if state == 'committed' then
  if r.fp then
    if r.fp ~= fp then return {'refused', {'different_usage'}, {}} end
    return {'ok', redis.call('HGETALL', rkey), balances()}
  end
  -- Counted before this commit was recorded.
  redis.call('HSET', rkey, 'fp', fp)
  return {'ok', redis.call('HGETALL', rkey), balances()}
end

-- Held, or expired (swept or not): the actual amounts replace the estimate.
free(rkey, r)
r.state, r.fp = 'committed', fp
if r.counted ~= '1' then
  r.holds = format_holds(holds)
  hold(holds)
end
save(rkey, r)
redis.call('ZREM', P .. 'exp', key)
if r.counted ~= '1' then
  -- Committed usage is held until counted: the record must not expire first.
  redis.call('PERSIST', rkey)
  if r.idem then redis.call('PERSIST', P .. 'idem:' .. r.idem) end
end
return {'ok', redis.call('HGETALL', rkey), balances()}
