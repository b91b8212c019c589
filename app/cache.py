"""Redis read-through repository of entity state whose writes never replace a newer sequence.

Redis key `entity:<entity>:<key>` holds the JSON `{"sequence": n, "state": {...}}`, or the
tombstone `{"sequence": n, "deleted": true}` (with a TTL) for a deleted or missing entity.
`state` is the aggregate's data exactly as its events carry it (`app.capture.plans.state_sql`):
root columns plus extensions nested (an order's `shipping`), no sensitive columns, and
timestamps as epoch microseconds (ints), like the Avro `timestamp-micros` fields.

Traps:
- Every write goes through a Lua script that compares sequences inside Redis, so the
  cache agent (`apply_many`, one script call per batch) and readers filling misses may race freely:
  the higher sequence always wins, and a tombstone keeps a slow reader from resurrecting
  a deleted entity while it lives.
- A fill is dropped when its database snapshot is older than half the shortest TTL in use
  (tombstones, `state_ttl`): an entry newer than that snapshot was written after it, so it is
  still alive when the fill arrives and the script keeps it. Entries removed otherwise
  (`maxmemory` eviction, DEL) open a gap a slow fill may fill with older state until the next
  event of that key: run Redis with `noeviction`, or set `state_ttl` to bound that staleness.
- Redis down: reads fall back to the database and stop trying Redis for
  `redis_retry_interval`; `apply` raises, so the agent retries the event instead of losing it.

Over 300 lines on purpose: the key layout, the Lua scripts, the entry format and the
repository make one consistency argument (the traps above), checked by reading them together.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.sql.elements import TextClause

from app.capture.plans import plan_for, state_sql
from app.capture.roles import WORKER
from app.orm import Database, EventedBase
from app.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["CacheRepository", "CacheStats", "connect_redis", "decode_entry", "encode_entry"]

#: Errors that mean "Redis is unreachable" (as opposed to a bad command).
_OUTAGE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)

#: The one rule of every cache write, as a Lua function: write `value` (TTL in ms, 0 = none)
#: under `key` unless the stored entry has a higher-or-equal sequence. Returns true when
#: written, else false and the stored value.
_LUA_SET_IF_NEWER = """
local function set_if_newer(key, sequence, value, ttl)
  local cur = redis.call('GET', key)
  if cur then
    -- Our own values start with the sequence: read it without decoding the whole state.
    local seq = string.match(cur, '^{"sequence":(%d+)')
    if not seq then
      local ok, doc = pcall(cjson.decode, cur)
      if ok and type(doc) == 'table' then seq = doc['sequence'] end
    end
    seq = tonumber(seq)
    if seq and seq >= tonumber(sequence) then
      return false, cur
    end
  end
  if tonumber(ttl) > 0 then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
  return true, nil
end
"""

#: KEYS[1] = entity key; ARGV = sequence, JSON value, TTL in ms (0 = none).
#: Returns 1 when written, else the stored value (which has a higher-or-equal sequence).
_SET_IF_NEWER = _LUA_SET_IF_NEWER + """
local written, cur = set_if_newer(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if written then return 1 end
return cur
"""

#: The same over many keys in one call: KEYS[i] with ARGV[3i-2..3i]. Returns how many were written.
_SET_MANY_IF_NEWER = _LUA_SET_IF_NEWER + """
local written = 0
for i, key in ipairs(KEYS) do
  local base = 3 * (i - 1)
  if set_if_newer(key, ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]) then
    written = written + 1
  end
end
return written
"""

#: Keys per `_SET_MANY_IF_NEWER` call: a script blocks Redis while it runs, so a huge batch
#: is split into calls of this size (a few hundred small SETs take well under a millisecond).
MANY_CHUNK = 500

#: (sequence, state); state None = deleted or never existed.
Entry = tuple[int, dict[str, Any] | None]
#: Called after a database load and before its fill, with (entity, keys): instrumentation, tests.
AfterLoad = Callable[[str, list[str]], Awaitable[None]]


@dataclass
class CacheStats:
    """What the repository has done; exported as Prometheus counters."""

    hits: int = 0
    misses: int = 0
    fills: int = 0
    refreshes_applied: int = 0
    stale_rejections: int = 0
    redis_errors: int = 0
    db_loads: int = 0
    # Reads that skipped Redis because it failed less than `redis_retry_interval` ago.
    redis_bypassed: int = 0


#: What every cached entity's Redis key starts with, after the namespace.
KEY_PREFIX = "entity:"


def entity_key(namespace: str, entity: str, key: Any) -> str:
    """The Redis key of one cached entity (the layout in the module docstring)."""
    return f"{namespace}{KEY_PREFIX}{entity}:{key}"


def every_entity_key(namespace: str = "") -> str:
    """A SCAN pattern matching every cached entity's key (replay deletes them)."""
    return f"{namespace}{KEY_PREFIX}*"


def connect_redis(url: str, *, timeout: float = 0.25, max_connections: int = 64,
                  pool_timeout: float = 2.0) -> Redis:
    """A client for the cache: short timeouts and no retries, so an outage never stalls readers.

    The pool is bounded and blocking: a burst of more concurrent commands than
    `max_connections` waits up to `pool_timeout` for a connection instead of failing.
    """
    # redis-py's default retries 10 times with backoff: seconds per command while Redis is down.
    # redis-py 8 caps the default asyncio pool at 100 connections and raises "Too many
    # connections" (a ConnectionError, so it looked like an outage) past it; redis-py 5 had no
    # cap. A blocking pool of our own size behaves the same on every version.
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                           socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0))
    return Redis.from_pool(pool)


@functools.cache
def _load_sql(root: type[EventedBase]) -> TextClause:
    """State and sequence of many keys in one statement, hence one snapshot: they always match."""
    plan = plan_for(root)
    return text(f"""
SELECT ev.key, s.seq, CAST({state_sql(root)} AS text) AS state
FROM unnest(CAST(:keys AS text[])) AS ev(key)
LEFT JOIN event_sequences s ON s.entity = :entity AND s.key = ev.key""").bindparams(
        entity=plan.root_entity)


def encode_entry(sequence: int, state: dict[str, Any] | None) -> str:
    """The Redis value of an entry; the sequence comes first so the Lua script finds it cheaply."""
    doc: dict[str, Any] = {"sequence": sequence}
    if state is None:
        doc["deleted"] = True
    else:
        doc["state"] = state
    return json.dumps(doc, separators=(",", ":"))


def decode_entry(raw: bytes | str) -> Entry | None:
    """(sequence, state) of a Redis value, or None if it is not one of ours."""
    try:
        doc = json.loads(raw)
        sequence = int(doc["sequence"])
    except (ValueError, KeyError, TypeError):
        return None
    if doc.get("deleted"):
        return sequence, None
    state = doc.get("state")
    return (sequence, state) if isinstance(state, dict) else None


class CacheRepository:
    """Entity state read from Redis first, from the database on a miss, filled on the way back."""

    def __init__(self, redis: Redis, db: Database, *, tombstone_ttl: float = 60,
                 state_ttl: float | None = None, namespace: str = "",
                 redis_retry_interval: float = 1.0, after_load: AfterLoad | None = None) -> None:
        """Wrap `redis` (see `connect_redis`) and `db`; `namespace` prefixes every Redis key."""
        if tombstone_ttl <= 0:
            raise ValueError("tombstone_ttl must be positive: tombstones are what stop resurrection")
        self.redis = redis
        self.db = db
        self.namespace = namespace
        self.tombstone_ttl = tombstone_ttl
        self.state_ttl = state_ttl
        self.redis_retry_interval = redis_retry_interval
        self.max_fill_age = min(tombstone_ttl, state_ttl or tombstone_ttl) / 2
        self.stats = CacheStats()
        self._after_load = after_load
        # Registering computes the SHA only; EVALSHA loads the script on first use.
        self._set_if_newer = redis.register_script(_SET_IF_NEWER)
        self._set_many_if_newer = redis.register_script(_SET_MANY_IF_NEWER)
        self._inflight: dict[tuple[str, str], asyncio.Task[dict[str, Entry]]] = {}
        self._redis_down_until = 0.0

    def key_of(self, entity: str, key: Any) -> str:
        """The Redis key of an entity."""
        return entity_key(self.namespace, entity, key)

    async def get(self, model: type[EventedBase], key: Any) -> dict[str, Any] | None:
        """The state of one aggregate of `model`, or None if it does not exist."""
        return (await self.get_many(model, [key]))[key]

    async def get_many(self, model: type[EventedBase], keys: Iterable[Any]) -> dict[Any, dict[str, Any] | None]:
        """key -> state (None if absent) for many aggregates: one MGET, one query for the misses."""
        plan = plan_for(model)
        entity = plan.root_entity
        wanted = {key: str(key) for key in keys}
        unique = list(dict.fromkeys(wanted.values()))
        if not unique:
            return {}
        found: dict[str, dict[str, Any] | None] = {}
        cached = await self._read(entity, unique)
        if cached is not None:
            for skey, entry in zip(unique, cached, strict=True):
                if entry is None:
                    self.stats.misses += 1
                else:
                    self.stats.hits += 1
                    found[skey] = entry[1]
        missing = [k for k in unique if k not in found]
        if missing:
            loaded = await self._load_shared(plan.root, missing, fill=cached is not None)
            found.update((k, state) for k, (_, state) in loaded.items())
        return {key: found[skey] for key, skey in wanted.items()}

    async def apply(self, entity: str, key: Any, sequence: int, state: dict[str, Any] | None) -> bool:
        """Store an event's state (None = delete: a tombstone) unless Redis has a newer one."""
        try:
            result = await self._set_if_newer(keys=[self.key_of(entity, key)],
                                              args=self._script_args(sequence, state))
        except _OUTAGE as exc:
            # Raised on purpose: the agent must retry the event, or the cache stays stale.
            self._redis_failed(exc)
            raise
        if result == 1:
            self.stats.refreshes_applied += 1
            return True
        self.stats.stale_rejections += 1
        return False

    async def apply_many(self, updates: Iterable[tuple[str, Any, int, dict[str, Any] | None]]) -> int:
        """Store many events' states at once, each unless Redis has a newer one; returns how many were written.

        `updates` are (entity, key, sequence, state) in any order: per Redis key only the
        highest sequence is sent (the last of equal ones), so a batch costs one script call
        per `MANY_CHUNK` distinct keys, made one after the other on one connection.
        """
        newest: dict[str, tuple[int, dict[str, Any] | None]] = {}
        for entity, key, sequence, state in updates:
            rkey = self.key_of(entity, key)
            held = newest.get(rkey)
            if held is None or sequence >= held[0]:
                newest[rkey] = (sequence, state)
        items = list(newest.items())
        written = 0
        for start in range(0, len(items), MANY_CHUNK):
            chunk = items[start:start + MANY_CHUNK]
            args: list[str | int] = []
            for _, (sequence, state) in chunk:
                args.extend(self._script_args(sequence, state))
            try:
                done = int(await self._set_many_if_newer(keys=[k for k, _ in chunk], args=args))
            except _OUTAGE as exc:
                # Raised on purpose: the agent must retry the batch, or the cache stays stale.
                self._redis_failed(exc)
                raise
            written += done
            self.stats.refreshes_applied += done
            self.stats.stale_rejections += len(chunk) - done
        return written

    def _script_args(self, sequence: int, state: dict[str, Any] | None) -> list[str | int]:
        """ARGV of the script: tombstones always expire, live entries after `state_ttl` if set."""
        ttl = self.tombstone_ttl if state is None else self.state_ttl
        ttl_ms = max(1, round(ttl * 1000)) if ttl else 0
        return [sequence, encode_entry(sequence, state), ttl_ms]

    async def _read(self, entity: str, keys: list[str]) -> list[Entry | None] | None:
        """Entries found in Redis (None per miss), or None when Redis is unavailable."""
        if time.monotonic() < self._redis_down_until:
            self.stats.redis_bypassed += 1
            return None
        try:
            raw = await self.redis.mget([self.key_of(entity, k) for k in keys])
        except _OUTAGE as exc:
            self._redis_failed(exc)
            return None
        return [None if value is None else decode_entry(value) for value in raw]

    def _redis_failed(self, exc: BaseException) -> None:
        """Count an outage and read from the database only for `redis_retry_interval`."""
        self.stats.redis_errors += 1
        now = time.monotonic()
        if now >= self._redis_down_until:
            log.warning("redis unavailable, reading from the database for %.1f s: %s",
                        self.redis_retry_interval, exc)
        self._redis_down_until = now + self.redis_retry_interval

    async def _load_shared(self, root: type[EventedBase], keys: list[str], *, fill: bool) -> dict[str, Entry]:
        """Load `keys`, joining loads already in flight so a key is read from the database once."""
        entity = plan_for(root).root_entity
        tasks: dict[str, asyncio.Task[dict[str, Entry]]] = {}
        new: list[str] = []
        for key in keys:
            task = self._inflight.get((entity, key))
            if task is None:
                new.append(key)
            else:
                tasks[key] = task
        if new:
            # A task of its own, not the caller's: a cancelled caller must not cancel the
            # load other readers wait for.
            task = asyncio.get_running_loop().create_task(
                self._load_and_fill(root, new, fill=fill), name=f"cache-load:{entity}")
            for key in new:
                self._inflight[(entity, key)] = task
                tasks[key] = task
            task.add_done_callback(functools.partial(self._forget, entity, new))
        results: dict[str, Entry] = {}
        for task in dict.fromkeys(tasks.values()):
            results.update(await asyncio.shield(task))
        return {key: results[key] for key in keys}

    def _forget(self, entity: str, keys: list[str], task: asyncio.Task[dict[str, Entry]]) -> None:
        """Drop a finished load from the in-flight map, so the next miss reads the database again."""
        for key in keys:
            if self._inflight.get((entity, key)) is task:
                del self._inflight[(entity, key)]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already, or none is left to

    async def _load_and_fill(self, root: type[EventedBase], keys: list[str], *, fill: bool) -> dict[str, Entry]:
        """One shared load: read the database, then fill Redis unless the snapshot is too old."""
        entity = plan_for(root).root_entity
        started = time.monotonic()
        entries = await self._load(root, keys)
        if self._after_load is not None:
            await self._after_load(entity, keys)
        if not fill:
            return entries
        if time.monotonic() - started > self.max_fill_age:
            # A newer entry (a tombstone) this snapshot predates may have expired: filling could resurrect.
            log.info("dropping a fill of %d %s: database read took too long", len(keys), entity)
            return entries
        return await self._fill(entity, entries)

    async def _load(self, root: type[EventedBase], keys: list[str]) -> dict[str, Entry]:
        """(sequence, state) of each key from the database; sequence 0 if it never had an event."""
        self.stats.db_loads += 1
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(_load_sql(root), {"keys": keys})).all()
        return {key: (seq or 0, None if state is None else json.loads(state)) for key, seq, state in rows}

    async def _fill(self, entity: str, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Write loaded entries (absent ones as tombstones); where Redis is newer, return its entry."""
        if time.monotonic() < self._redis_down_until:
            return entries
        try:
            if len(entries) == 1:
                # One round trip; a pipeline would add a SCRIPT EXISTS before its EVALSHA.
                [(key, (sequence, state))] = entries.items()
                results = [await self._set_if_newer(keys=[self.key_of(entity, key)],
                                                    args=self._script_args(sequence, state))]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, (sequence, state) in entries.items():
                        await self._set_if_newer(keys=[self.key_of(entity, key)],
                                                 args=self._script_args(sequence, state), client=pipe)
                    results = await pipe.execute()
        except _OUTAGE as exc:
            self._redis_failed(exc)
            return entries
        except RedisError as exc:
            # A fill is an optimization: a full or read-only Redis must not fail the read.
            self.stats.redis_errors += 1
            log.warning("cache fill of %d %s failed: %s", len(entries), entity, exc)
            return entries
        out = dict(entries)
        for key, result in zip(entries, results, strict=True):
            if result == 1:
                self.stats.fills += 1
                continue
            self.stats.stale_rejections += 1
            newer = decode_entry(result)
            if newer is not None:
                out[key] = newer  # never hand out something older than what the cache holds
        return out


class CacheResource:
    """The worker's one cache repository: opened on first use, closed with the worker.

    `app/main.py` creates it and hands it to the cache agents, `/entities` and the metrics, so
    a worker keeps one Redis client and pool, and readers share in-flight database loads.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._repo: CacheRepository | None = None

    @property
    def opened(self) -> CacheRepository | None:
        """The repository if it has been opened, without opening it (for metrics scrapes)."""
        return self._repo

    @property
    def repo(self) -> CacheRepository:
        """The repository (Redis client and database pool are created lazily)."""
        if self._repo is None:
            self._repo = CacheRepository(
                connect_redis(self.settings.redis_url),
                Database(self.settings.database_url_for(WORKER), service=WORKER, record_reads=False))
        return self._repo

    async def close(self) -> None:
        """Close the Redis client and the database pool."""
        if self._repo is not None:
            await self._repo.redis.aclose()
            await self._repo.db.close()
            self._repo = None
