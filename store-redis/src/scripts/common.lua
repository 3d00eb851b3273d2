-- Shared by every script (prepended to each). ARGV[1] is the tenant's key
-- prefix `{ml:<tenant>}:`; every key a script touches is built from it, so
-- all of them are in the slot of the script's KEYS[1].
--
-- Amounts never become Lua numbers (doubles, exact only to 2^53): they travel
-- as decimal text and are added by Redis (INCRBY/DECRBY, 64-bit). The one
-- comparison, in `admits`, splits each into two parts exact in a double.

local P = ARGV[1]
local BASE = 1000000000

local function corrupt(key, what)
  error({err = 'MLCORRUPT ' .. key .. ': ' .. what})
end

-- A 64-bit integer's text as {hi, lo} with value hi * 1e9 + lo, 0 <= lo < 1e9.
local function big(text)
  if not text then return {0, 0} end
  local sign, digits = string.match(text, '^(%-?)(%d+)$')
  if not digits then corrupt('amount', 'not an integer: ' .. tostring(text)) end
  local n = #digits
  local lo = tonumber(string.sub(digits, math.max(1, n - 8)))
  local hi = 0
  if n > 9 then hi = tonumber(string.sub(digits, 1, n - 9)) end
  if sign == '-' then
    hi, lo = -hi, -lo
    if lo < 0 then lo = lo + BASE; hi = hi - 1 end
  end
  return {hi, lo}
end

local function plus(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= BASE then lo = lo - BASE; hi = hi + 1 end
  return {hi, lo}
end

local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

-- `book::admits` for a hard limit: room left, and the hold fits.
local function admits(used, held, amount, limit)
  local taken = plus(big(used), big(held))
  local l = big(limit)
  return less(taken, l) and not less(l, plus(taken, big(amount)))
end

-- A record's holds: one "amount keep_until counter" line each.
local function parse_holds(rkey, text)
  local out = {}
  if not text or text == '' then return out end
  for line in string.gmatch(text, '[^\n]+') do
    local amount, keep, counter = string.match(line, '^(%-?%d+) (%-?%d+) (.+)$')
    if not amount then corrupt(rkey, 'bad hold line') end
    out[#out + 1] = {counter = counter, amount = amount, keep = keep}
  end
  return out
end

local function format_holds(holds)
  local lines = {}
  for _, h in ipairs(holds) do
    if h.amount ~= '0' then lines[#lines + 1] = h.amount .. ' ' .. h.keep .. ' ' .. h.counter end
  end
  return table.concat(lines, '\n')
end

-- Adds holds to their counters' held sums; a counter lives until its keep_until.
local function hold(holds)
  for _, h in ipairs(holds) do
    if h.amount ~= '0' then
      local key = P .. 'h:' .. h.counter
      redis.call('INCRBY', key, h.amount)
      redis.call('EXPIREAT', key, h.keep)
    end
  end
end

local function unhold(holds)
  for _, h in ipairs(holds) do
    local key = P .. 'h:' .. h.counter
    if redis.call('DECRBY', key, h.amount) == 0 then
      redis.call('DEL', key)
    elseif redis.call('PTTL', key) == -1 then
      -- The sum had expired before its hold went (a commit left uncounted
      -- past keep_until): DECRBY made a fresh key, which must expire too.
      redis.call('EXPIREAT', key, h.keep)
    end
  end
end

local function load(rkey)
  local flat = redis.call('HGETALL', rkey)
  if #flat == 0 then return nil end
  local r = {}
  for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
  return r
end

-- Writes the fields a transition may change.
local function save(rkey, r)
  redis.call('HSET', rkey, 'state', r.state, 'counted', r.counted, 'holds', r.holds)
  if r.fp then redis.call('HSET', rkey, 'fp', r.fp) end
end

-- Frees what a record holds (whatever its state) and empties its holds.
local function free(rkey, r)
  unhold(parse_holds(rkey, r.holds))
  r.holds = ''
end

-- `Reservation::state_at`.
local function state_at(r, now)
  if r.state == 'held' and tonumber(r.expires_at_ms) <= tonumber(now) then return 'expired' end
  return r.state
end

-- Drops holds past their expiry (`reservation::expire`), at most 100 a call.
local function sweep(now)
  local due = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, 100)
  for _, key in ipairs(due) do
    local rkey = P .. 'r:' .. key
    local r = load(rkey)
    if r and r.state == 'held' then
      free(rkey, r)
      r.state = 'expired'
      save(rkey, r)
    end
    redis.call('ZREM', P .. 'exp', key)
  end
end

-- Holds given as ARGV triples (counter, amount, keep_until) from index i.
local function read_holds(i, n)
  local out = {}
  for _ = 1, n do
    out[#out + 1] = {counter = ARGV[i], amount = ARGV[i + 1], keep = ARGV[i + 2]}
    i = i + 3
  end
  return out, i
end
