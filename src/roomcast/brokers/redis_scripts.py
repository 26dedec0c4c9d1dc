"""The Lua scripts of :mod:`roomcast.brokers.redis`, with their KEYS and ARGV.

A stream entry is ``{t: ms stored, d: data, i: info}`` with the id ``{offset}-1``: the broker
stores the publisher's bytes as they are and never parses them.
"""

from __future__ import annotations

__all__ = [
    "HISTORY",
    "LAYOUT",
    "POSITION",
    "PRESENCE",
    "PRESENCE_BATCH",
    "PUBLISH",
    "WHOAMI",
    "for_process",
]

#: The layout of the stream entries, kept in each channel's meta (``layout``): ``2`` is
#: ``{t, d, i}``; the entries of 0.2's development builds held a finished frame (``{t, f}``).
LAYOUT = "2"

#: A publication skips this many offsets per second of the time since its channel's last
#: publication, when the Redis process it runs in did not write that publication (see PROLOGUE):
#: far more than one channel's publications per second on any Redis.
SKIP_RATE = 1_000_000
#: Seconds added to that time for the clocks of two machines (a replica's and its master's).
SKIP_SKEW = 10
#: Past this many seconds, the channel's stream begins again (a new epoch) instead.
SKIP_WINDOW = 600

# Every stream script begins with this. KEYS[1] meta, KEYS[2] stream; ARGV[1] a new epoch, ARGV[2]
# the meta key's TTL (s). @RUN@ is the run id of the Redis process the script is loaded into
# (the broker builds the scripts for each process: see RedisBroker._scripts_for), so a script
# knows whether this process wrote the channel's last publication (``gen`` in the meta).
#
# When it did not, the data came from elsewhere: a replica promoted by a failover, or a restart
# that loaded a snapshot or an AOF. Publications made after that data was copied may be missing
# here, and their offsets were handed out: they must never be handed out again under the same
# epoch. So the channel skips every offset they can have had (SKIP_RATE per second since its
# last publication here, plus SKIP_SKEW), keeping its epoch and its history: subscribers recover
# across a failover. A channel whose last publication is older than SKIP_WINDOW, or without
# meta, or with entries of another layout than LAYOUT (an upgrade: they would be misread),
# begins again: a new epoch, offset 0, no history. Beginning again deletes whatever stream is
# left, so that offsets and stream ids start together (an orphaned stream whose ids run ahead of
# a recreated meta would make the next XADD fail).
PROLOGUE = (
    """
local run = '@RUN@'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'layout', 'at', 'offset')
local epoch = meta[1]
if epoch and meta[3] == '@LAYOUT@' and meta[2] ~= run then
  local since = math.max(0, now - tonumber(meta[4] or 0))
  if meta[4] and since <= @WINDOW@ * 1000 then
    local skip = math.floor((since + @SKEW@ * 1000) * @RATE@ / 1000)
    redis.call('HSET', KEYS[1], 'gen', run, 'offset', tonumber(meta[5] or 0) + skip, 'at', now)
  else
    epoch = false
  end
end
if not epoch or meta[3] ~= '@LAYOUT@' then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'gen', run, 'offset', 0, 'bytes', 0,
    'layout', '@LAYOUT@', 'at', now)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
""".replace("@LAYOUT@", LAYOUT)
    .replace("@WINDOW@", str(SKIP_WINDOW))
    .replace("@SKEW@", str(SKIP_SKEW))
    .replace("@RATE@", str(SKIP_RATE))
)

#: The run id of the Redis process that runs it (the broker builds the scripts with it).
WHOAMI = "return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"


def for_process(source: str, run: str) -> str:
    """``source`` (a stream script) as loaded into the Redis process whose run id is ``run``."""
    return source.replace("@RUN@", run)


# Drops the oldest history entries while there are more than ARGV[size] of them or they hold
# more than ARGV[bytes] bytes of data and info; keeps the meta's byte count. (Expects `count`.)
TRIM = """
local total = tonumber(redis.call('HGET', KEYS[1], 'bytes') or 0)
while count > 0 and (count > size or total > max_bytes) do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #oldest == 0 then break end
  redis.call('XDEL', KEYS[2], oldest[1][1])
  total = total - string.len(oldest[1][2][4]) - string.len(oldest[1][2][6])
  count = count - 1
end
redis.call('HSET', KEYS[1], 'bytes', total)
"""

# KEYS: meta, stream. ARGV: new epoch, meta TTL (s), data, info, history size, history TTL (s),
# pubsub channel, history bytes, the publishing command (PUBLISH; a cluster's SPUBLISH). Stores
# the entry {t: ms, d: data, i: info}; returns {epoch, offset}. Live message:
# "P <epoch> <offset> <len(info)> <info><data>".
PUBLISH = (
    PROLOGUE
    + """
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('HSET', KEYS[1], 'at', now)
local size = tonumber(ARGV[5])
if size > 0 then
  local ms = now
  local id = offset .. '-1'
  if not pcall(redis.call, 'XADD', KEYS[2], id, 't', ms, 'd', ARGV[3], 'i', ARGV[4]) then
    -- A stream left from before (its ids ahead of this offset): it cannot be this epoch's.
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'bytes', 0)
    redis.call('XADD', KEYS[2], id, 't', ms, 'd', ARGV[3], 'i', ARGV[4])
  end
  redis.call('HINCRBY', KEYS[1], 'bytes', string.len(ARGV[3]) + string.len(ARGV[4]))
  local count = redis.call('XLEN', KEYS[2])
  local max_bytes = tonumber(ARGV[8])
"""
    + TRIM
    + """
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call(ARGV[9], ARGV[7],
  'P ' .. epoch .. ' ' .. offset .. ' ' .. string.len(ARGV[4]) .. ' ' .. ARGV[4] .. ARGV[3])
return {epoch, offset}
"""
)

# KEYS: meta, stream. ARGV: new epoch, meta TTL (s). Returns {epoch, offset}.
POSITION = (
    PROLOGUE
    + """
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'offset'))}
"""
)

# KEYS: meta, stream. ARGV: new epoch, meta TTL (s), history TTL (s), mode
# (since|before|latest), bound, limit. Drops entries older than the history TTL first; returns
# {epoch, offset, start, id1, data1, info1, id2, ...}.
HISTORY = (
    PROLOGUE
    + """
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local cutoff = now - tonumber(ARGV[3]) * 1000
local expired = 0
while true do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
  if #oldest == 0 then break end
  local fields = oldest[1][2]
  if tonumber(fields[2]) >= cutoff then break end
  redis.call('XDEL', KEYS[2], oldest[1][1])
  expired = expired + string.len(fields[4]) + string.len(fields[6])
end
if expired > 0 then redis.call('HINCRBY', KEYS[1], 'bytes', -expired) end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local start = offset + 1
if #first > 0 then start = tonumber(string.match(first[1][1], '^(%d+)')) end
local mode = ARGV[4]
local bound = tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local entries
if mode == 'since' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. bound .. '-1', '+', 'COUNT', limit)
elseif mode == 'before' then
  if bound <= 1 then
    entries = {}
  else
    entries = redis.call('XREVRANGE', KEYS[2], (bound - 1) .. '-1', '-', 'COUNT', limit)
  end
else
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
end
local out = {epoch, offset, start}
local function add(entry)
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][4]
  out[#out + 1] = entry[2][6]
end
if mode == 'since' then
  for i = 1, #entries do add(entries[i]) end
else
  for i = #entries, 1, -1 do add(entries[i]) end
end
return out
"""
)

#: Presence entries per Redis command, at most: Lua's unpack() fails past about 8000 values (its
#: stack limit), and one command with every entry of a big channel would hold Redis for all of it.
PRESENCE_BATCH = 1000

# KEYS: presence hash, presence zset. ARGV: now (ms), batch (PRESENCE_BATCH). Drops the expired
# entries (a dead node's), however many, then returns the others. No command takes more than a
# batch of members.
PRESENCE = """
local batch = tonumber(ARGV[2])
while true do
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, batch)
  if #gone == 0 then break end
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
local out = {}
for first = 1, #live, batch do
  local last = math.min(first + batch - 1, #live)
  local found = redis.call('HMGET', KEYS[1], unpack(live, first, last))
  for i = 1, #found do out[#out + 1] = found[i] end
end
return out
"""
