-- fire: ARGV = prefix, now (Unix secs), n, n x (marker, subject, keep_until).
-- For each crossing, sets its fired-marker `n:<marker>` if absent (expiring
-- with its counter) and, only then, gives it an alert time: `now`, or one
-- second past the subject's last one (`la:<subject>`), so that no two limit
-- alerts of a subject share the alerts table's key (tenant, user, rule,
-- opened_at). Returns, per crossing, that time as text, or '' when it had
-- fired before.
local now = tonumber(ARGV[2])
local out = {}
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local marker, subject, keep = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SET', P .. 'n:' .. marker, '1', 'NX', 'EXAT', keep) then
    local last = P .. 'la:' .. subject
    local at = math.max(now, tonumber(redis.call('GET', last) or '0') + 1)
    redis.call('SET', last, tostring(at), 'EXAT', math.max(tonumber(keep), at + 1))
    out[#out + 1] = tostring(at)
  else
    out[#out + 1] = ''
  end
  i = i + 3
end
return out
