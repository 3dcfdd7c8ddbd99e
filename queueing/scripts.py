"""Lua scripts: the steps that must be atomic on the Redis side.

Admission control lives here: reading the queue length and appending must be one step, or
two producers could both see room for one more entry.
"""

from __future__ import annotations

#: The model's queue cap into ``cap`` (0: none); fails with ``UNKNOWN_MODEL`` when no pool
#: has ever served the model on this Redis. KEYS[2] is the model's info hash.
_CAP = """
local cap = redis.call('HGET', KEYS[2], 'max_queue')
if not cap then
  return redis.error_reply('UNKNOWN_MODEL')
end
cap = tonumber(cap)
"""

#: The epoch of this Redis (see queueing.redis_state), when KEYS[3] names its key: read,
#: or set to ``ARGV[1]`` (a fresh one the client made) if no one has yet. A producer tags
#: each request with the epoch it was queued in, so that after a restart it fails only the
#: requests queued in the Redis that is gone (RequestLost), not those the new one holds.
#: ``false`` without KEYS[3] (a cluster: the key lives in another slot).
_EPOCH = """
local epoch = false
if #KEYS > 2 then
  epoch = redis.call('GET', KEYS[3])
  if not epoch then
    redis.call('SET', KEYS[3], ARGV[1])
    epoch = ARGV[1]
  end
end
"""

#: How much room a model's queue has for ``ARGV[1]`` more requests: the first step of
#: enqueueing large requests, whose bodies should not pass through Lua (Redis copies every
#: script argument into a Lua string: for a 600 KB image that costs it ~4x the XADD).
#: KEYS, ARGV[1] and the UNKNOWN_MODEL error as for ENQUEUE; ARGV[2] the count. Returns
#: the epoch, then how many of them fit.
ROOM = (
    _CAP
    + _EPOCH
    + """
local wanted = tonumber(ARGV[2])
if cap == 0 then
  return {epoch, wanted}
end
local room = cap - redis.call('XLEN', KEYS[1])
if room < 0 then
  room = 0
end
return {epoch, math.min(room, wanted)}
"""
)

#: Append requests to a model's stream unless the queue is at its cap.
#:
#: KEYS[1] the model's stream, KEYS[2] the model's info hash (written by its workers),
#:         KEYS[3] (optional) the epoch's key.
#: ARGV    a new epoch (used if Redis has none yet), then triples: request id, reply
#:         stream, body.
#: Returns the epoch (``false`` without KEYS[3]), then one item per request: its stream
#: entry id, or 0 when the queue was full.
#: Fails with ``UNKNOWN_MODEL`` when no pool has ever served the model on this Redis:
#: a typo in a model name should be an error now, not a request that waits forever.
#: Not ``XADD MAXLEN``: trimming would delete entries that were read but not yet acked.
ENQUEUE = (
    _CAP
    + _EPOCH
    + """
local length = redis.call('XLEN', KEYS[1])
local ids = {epoch}
for i = 2, #ARGV, 3 do
  if cap > 0 and length >= cap then
    ids[#ids + 1] = 0
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*',
      'id', ARGV[i], 'reply', ARGV[i + 1], 'body', ARGV[i + 2])
    length = length + 1
  end
end
return ids
"""
)
