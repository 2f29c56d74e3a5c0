-- GCRA decision for one limiter key, atomically (a script runs alone in Redis).
-- KEYS[1]: the limiter's key, holding the theoretical arrival time (TAT) in microseconds of server time.
-- ARGV[1]: emission interval in microseconds; ARGV[2]: limit (requests allowed at once).
-- Returns {allowed (1/0), remaining, reset_after_us, retry_after_us}; the same arithmetic as gcra.rs.
-- Numbers stay below 2^53 (now is about 1.8e15 µs), so Lua's doubles hold them exactly.
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + interval
local burst = limit * interval
if new_tat - now <= burst then
  -- The key expires when the bucket is full again: absent and expired mean the same.
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
  return {1, math.floor((burst - (new_tat - now)) / interval), new_tat - now, 0}
end
return {0, 0, tat - now, new_tat - now - burst}
