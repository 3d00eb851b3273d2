-- balances: ARGV = prefix, now_ms, counters... Returns used, held per counter.
sweep(ARGV[2])
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('GET', P .. 'u:' .. ARGV[i]) or '0'
  out[#out + 1] = redis.call('GET', P .. 'h:' .. ARGV[i]) or '0'
end
return out
