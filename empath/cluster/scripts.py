"""The Lua scripts fleet mode runs in Redis: each one is atomic on the server, and each takes
the time from the server (``TIME``), so the nodes' clocks never have to agree.

Key layout (every key starts with ``cluster.key_prefix``, default ``empath:``):

- ``conn:<domain>``: sorted set of connection leases, member = lease id, score = expiry (ms);
  ``want:<domain>``: sorted set of the processes waiting for one of them (for 2 s after their
  last try): a process holds at most its fair part while others wait;
- ``rate:<domain>`` and ``rate:*`` (the global limit): GCRA theoretical arrival time (ms);
- ``brk:open:<domain>``: the breaker is open (value: failures; TTL: the cool-down);
  ``brk:half:<domain>``: a probe is owed (set with the breaker, removed when it closes);
  ``brk:probe:<domain>``: a probe is out (value: node; TTL: the lease time);
  ``breakers``: hash domain -> opening node, the index the background refresh reads;
- ``dedup:<key>``: an accepted message's queue id, TTL the duplicate window;
- ``nodes``: sorted set of node names scored by their last heartbeat (ms);
  ``node:<name>``: hash of the node's heartbeat records (``info``, ``worker:<n>``).
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: conn, open, half, probe, want; ARGV: limit, lease id, lease ms, node, process.
# Returns {granted, state, ms, failures}: state 0 closed, 1 open (ms left), 2 this lease is the
# probe, 3 another probe is out. A lease id already in the set is renewed (a parked lease).
ACQUIRE = _NOW + """
local open = redis.call('PTTL', KEYS[2])
if open > 0 then return {0, 1, open, redis.call('GET', KEYS[2]) or '0'} end
local state = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    return {0, 3, redis.call('PTTL', KEYS[4]), redis.call('GET', KEYS[3]) or '0'}
  end
  state = 2
end
local ms = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[5], now + 2000, ARGV[5])
    redis.call('PEXPIRE', KEYS[5], 2000)
    return {0, 0, 0, '0'}
  end
  redis.call('ZREM', KEYS[5], ARGV[5])
end
redis.call('ZADD', KEYS[1], now + ms, ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * ms)
if state == 2 then redis.call('SET', KEYS[4], ARGV[4], 'PX', ms) end
return {1, state, 0, '0'}
"""

# KEYS: conn sets (one per lease); ARGV: lease ms, then the lease ids in KEYS' order.
# Adds the lease again if it is gone (Redis restarted empty): the connection is still open.
RENEW = _NOW + """
local ms = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ms, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * ms)
end
return #KEYS
"""

# KEYS: conn sets; ARGV: the lease ids in KEYS' order.
RELEASE = """
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return #KEYS
"""

# GCRA. KEYS: rate key; ARGV: emission interval (ms), burst (tokens), tokens wanted.
# Returns {granted, ms to wait for the next one when none was granted} (as strings).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local n = math.floor((now + burst * interval - tat) / interval)
if n > tonumber(ARGV[3]) then n = tonumber(ARGV[3]) end
if n < 1 then return {'0', tostring(tat + interval - burst * interval - now)} end
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
return {tostring(n), '0'}
"""

# KEYS: open, half, probe, index; ARGV: domain, node, cooldown ms, failures.
OPEN = """
redis.call('SET', KEYS[1], ARGV[4], 'PX', tonumber(ARGV[3]))
redis.call('SET', KEYS[2], ARGV[4], 'PX', tonumber(ARGV[3]) + 86400000)
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
return 1
"""

# KEYS: open, half, probe, index; ARGV: domain.
CLOSE = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[4], ARGV[1])
return 1
"""

# KEYS: index; ARGV: key prefix. Every known breaker as {domain, ms open left, half, probing};
# entries whose breaker is gone (closed or its half key expired) leave the index.
BREAKERS = """
local out = {}
local names = redis.call('HKEYS', KEYS[1])
for _, d in ipairs(names) do
  local p = ARGV[1] .. 'brk:'
  local open = redis.call('PTTL', p .. 'open:' .. d)
  local half = redis.call('EXISTS', p .. 'half:' .. d)
  if open <= 0 and half == 0 then
    redis.call('HDEL', KEYS[1], d)
  else
    table.insert(out, {d, open, half, redis.call('EXISTS', p .. 'probe:' .. d)})
  end
end
return out
"""

# KEYS: dedup key; ARGV: queue id, window ms. Returns false when claimed, else the original id.
DEDUP_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return false end
return redis.call('GET', KEYS[1]) or '?'
"""

# KEYS: a key; ARGV: its expected value. Deletes it only when it still holds that value.
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: nodes, node hash; ARGV: node, field, value, alive window ms, keep ms.
# Records a heartbeat; returns how many nodes have one younger than the window.
HEARTBEAT = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[4]), '+inf')
"""

# KEYS: want keys; ARGV: this process. How many other processes wait on each key.
WANTED = _NOW + """
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  out[i] = redis.call('ZCARD', key) - (redis.call('ZSCORE', key, ARGV[1]) and 1 or 0)
end
return out
"""
