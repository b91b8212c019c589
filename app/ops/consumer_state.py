"""What the worker's Kafka consumer is doing, as one JSON-serialisable dump: for stalls after rebalances.

`consumer_state(app)` reads, without I/O and without waiting: per assigned partition aiokafka's
position, highwater, last fetch response, pause and reset state beside Faust's committed and read
offsets and flow sets; the fetcher's requests; the group coordinator's tasks; Faust's flow
control and table recovery; each agent's actors and queues; the commit guard's counters.
`GET /debug/consumer` serves it, and SIGUSR2 logs it (`ConsumerStateSignal`).

Trap: aiokafka runs on Faust's consumer thread and this reads its objects from the worker's
loop. A collection can change while it is copied: the copy is retried, and a section that
still fails holds `{"error": ...}` instead of failing the dump.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import faust
from mode import Service

from app import faust_compat as compat

log = logging.getLogger(__name__)

__all__ = ["ConsumerStateSignal", "consumer_state", "log_consumer_state"]

T = TypeVar("T")
JSON = Any


def consumer_state(app: faust.App) -> dict[str, JSON]:
    """The dump (see the module docstring); every section is there, or its error is."""
    try:
        consumer, found = compat.kafka_consumer(app), ""
    except Exception as exc:  # reported; the Faust sections may still say why
        consumer, found = None, _error(exc) or ""
    return {
        "taken_at": time.time(),
        "kafka_consumer": "started" if consumer is not None else found or "not started",
        "partitions": _section(lambda: _partitions(app, consumer)),
        "fetcher": _section(lambda: _fetcher(consumer)),
        "coordinator": _section(lambda: _coordinator(consumer)),
        "faust": _section(lambda: _faust(app)),
        "agents": _section(lambda: _agents(app)),
        "commit_guard": _section(lambda: _commit_guard(app)),
    }


def log_consumer_state(app: faust.App) -> None:
    """Log the dump as one JSON line at WARNING (what SIGUSR2 does)."""
    log.warning("consumer state: %s", json.dumps(consumer_state(app), sort_keys=True, default=repr))


class ConsumerStateSignal(Service):
    """Makes SIGUSR2 log the dump, from the moment the worker starts."""

    def __init__(self, app: faust.App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app

    async def on_start(self) -> None:
        """Take SIGUSR2 over: mode's Worker set it to enter pdb, which would block the loop."""
        # Left installed when the worker stops: a worker stuck shutting down is worth a dump too.
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, log_consumer_state, self.app)
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # not the main thread, or Windows
            log.info("consumer state: no SIGUSR2 handler (%s)", exc)


def _partitions(app: faust.App, consumer: Any) -> dict[str, JSON]:
    if consumer is None:
        return {}
    states = _copied(lambda: compat.partition_states(consumer))
    faust_consumer = app.consumer
    reads = _Reads(buffers=_copied(lambda: compat.fetched_buffers(compat.fetcher(consumer))),
                   committed=compat.committed_offsets(faust_consumer),
                   read=compat.read_offsets(faust_consumer),
                   flows=_copied(lambda: compat.flow_partitions(faust_consumer)), now_ms=time.time() * 1000)
    return {_tp_name(tp): _section(partial(_partition, tp, states[tp], reads)) for tp in sorted(states)}


@dataclasses.dataclass(frozen=True)
class _Reads:
    """What `_partition` looks each partition up in, read once per dump."""

    buffers: Mapping[Any, Any]
    committed: Mapping[Any, int | None]
    read: Mapping[Any, int | None]
    flows: Mapping[str, set[Any]]
    now_ms: float


def _partition(tp: Any, state: Any, reads: _Reads) -> dict[str, JSON]:
    # aiokafka's and Faust's tps are both (topic, partition) named tuples: equal, and hash alike.
    buffered = reads.buffers.get(tp)
    return {
        "status": compat.partition_status(state),
        "position": state.position if state.has_valid_position else None,
        "committed": reads.committed.get(tp), "read": reads.read.get(tp), "highwater": state.highwater,
        "last_fetch_seconds_ago": (None if state.timestamp is None
                                   else round((reads.now_ms - state.timestamp) / 1000, 3)),
        "awaiting_reset": state.awaiting_reset, "paused": state.paused,
        "faust_active": tp in reads.flows["active"], "faust_paused": tp in reads.flows["paused"],
        "faust_buffered": tp in reads.flows["buffered"],
        "fetched_buffered": buffered is not None,
        "fetch_error": _error(compat.fetch_error(buffered)) if buffered is not None else None,
    }


def _fetcher(consumer: Any) -> dict[str, JSON] | None:
    fetcher = compat.fetcher(consumer) if consumer is not None else None
    if fetcher is None:
        return None
    in_flight, pending, fetch_task = _copied(lambda: compat.fetcher_requests(fetcher))
    return {
        "in_flight_nodes": sorted(in_flight),
        "pending_tasks": sorted(_task_name(t) for t in pending),
        # aiokafka 0.14.0's `error_future` is the fetch task itself.
        "fetch_task": _task_state(fetch_task),
        "error_future": _task_state(fetcher.error_future),
    }


def _coordinator(consumer: Any) -> dict[str, JSON] | None:
    coordinator = compat.group_coordinator(consumer) if consumer is not None else None
    if coordinator is None:
        return None
    return {
        "generation": getattr(coordinator, "generation", None),
        "member_id": getattr(coordinator, "member_id", None),
        "coordinator_id": getattr(coordinator, "coordinator_id", None),
        "pending_exception": _error(compat.coordinator_pending_exception(coordinator)),
        "tasks": {name: _task_state(task) for name, task in compat.coordinator_tasks(coordinator).items()},
    }


def _faust(app: faust.App) -> dict[str, JSON]:
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on TableManager, not on TableManagerT
    running = sorted(_task_name(f) for f in compat.service_futures(recovery))
    return {
        "flow_active": app.consumer.flow_active,  # type: ignore[attr-defined]  # on Consumer, not ConsumerT
        "flow_control_active": app.flow_control.is_active(),
        "rebalancing": app.rebalancing,
        "in_recovery": app.in_recovery,
        "consumer_generation_id": app.consumer_generation_id,
        "recovery": {
            "in_recovery": recovery.in_recovery,
            "completed": recovery.completed.is_set(),
            "state": recovery.state,
            "running_tasks": running,
            # mode drops a finished task from the service: absent means done (or never started).
            "restart_recovery_running": compat.recovery_task(recovery) is not None,
        },
        # Where the drain loop (the one task that hands fetched messages to the streams) waits.
        "drain_loop": [_where(future) for future in compat.service_futures(compat.fetcher_service(app))],
    }


def _where(future: Any) -> str:
    """A task's coroutine chain, outermost first: where it waits now."""
    obj = future.get_coro() if hasattr(future, "get_coro") else None
    names = []
    for _ in range(100):
        if obj is None:
            break
        code = getattr(obj, "cr_code", None) or getattr(obj, "ag_code", None) or getattr(obj, "gi_code", None)
        names.append(code.co_name if code is not None else repr(obj)[:120])
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) or getattr(obj, "gi_yieldfrom", None)
    return " > ".join(names) + (" (done)" if future.done() else "")


def _agents(app: faust.App) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for name, agent in sorted(app.agents.items()):
        streams = []
        for actor in compat.agent_actors(agent):
            stream = getattr(actor, "stream", None)
            streams.append({"processors": len(compat.processors(stream)) if stream is not None else None})
        out[name] = {"actors": len(streams), "streams": streams}
    # The queues the drain loop fills (a full one blocks it), by the topics they carry.
    out["delivery_queues"] = [{"topics": topics, "size": queue.qsize(), "max": getattr(queue, "maxsize", None)}
                              for topics, queue in compat.delivery_queues(app)]
    return out


def _commit_guard(app: faust.App) -> JSON:
    # Optional: the guard exists only with the transport that commits through it.
    guard = getattr(app.consumer, "commit_guard", None)
    if guard is None:
        return None
    fields = ({f.name: getattr(guard, f.name) for f in dataclasses.fields(guard)}
              if dataclasses.is_dataclass(guard) else vars(guard))
    return _copied(lambda: {name: _jsonable(value) for name, value in fields.items()})


def _section(build: Callable[[], T]) -> T | dict[str, str]:
    try:
        return build()
    except Exception as exc:  # a diagnostic reports what it could not read, and goes on
        return {"error": _error(exc) or ""}


def _copied(read: Callable[[], T], attempts: int = 5) -> T:
    # The consumer thread may change a dict or set while it is copied here; a retry sees it settled.
    for _ in range(attempts - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


def _task_state(task: Any) -> dict[str, JSON] | None:
    if task is None:
        return None
    if not task.done():
        return {"done": False}
    if task.cancelled():
        return {"done": True, "cancelled": True}
    # Reading it marks it retrieved, so asyncio will not log it as never retrieved: the dump has it.
    return {"done": True, "exception": _error(task.exception())}


def _task_name(task: Any) -> str:
    # mode wraps a service's coroutine and keeps it as `__wrapped__`; aiokafka's tasks run theirs as is.
    coro = getattr(task, "__wrapped__", None) or (task.get_coro() if hasattr(task, "get_coro") else None)
    return str(getattr(coro, "__qualname__", None) or task)


def _tp_name(tp: Any) -> str:
    return f"{tp.topic}:{tp.partition}"


def _error(exc: BaseException | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def _jsonable(value: Any, depth: int = 4) -> JSON:
    """`value` as JSON: partition keys as "topic:partition", containers converted, else repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "topic") and hasattr(value, "partition"):
        return _tp_name(value)
    if depth <= 0:
        return repr(value)[:200]
    if isinstance(value, Mapping):
        items = sorted(((str(_jsonable(k, 0)), v) for k, v in list(value.items())), key=lambda kv: kv[0])
        return {k: _jsonable(v, depth - 1) for k, v in items}
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v, depth - 1) for v in list(value)), key=str)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth - 1) for v in value]
    return repr(value)[:200]
