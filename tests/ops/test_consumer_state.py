"""The consumer-state dump of a real worker: `GET /debug/consumer` and SIGUSR2."""
from __future__ import annotations

import json
import signal
from typing import Any

from tests.http import get_json
from tests.ops import test_ops
from tests.ops.test_ops import OpsWorker
from tests.processes import wait_for_log
from tests.waiting import until

#: The stall-app worker of tests/ops/test_ops.py (one process of its own for this module).
worker = test_ops.worker

#: What "recent" means for a partition's last fetch response: the worker fetches continuously.
RECENT_S = 15.0


async def dump(w: OpsWorker) -> dict[str, Any]:
    """The worker's consumer state, as `GET /debug/consumer` answers it."""
    status, body = await get_json(w.url + "/debug/consumer")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def orders_partitions(state: dict[str, Any]) -> dict[str, Any]:
    """The dump's entries of `orders-v2` partitions."""
    return {name: p for name, p in state["partitions"].items() if name.startswith("orders-v2:")}


def fetching(state: dict[str, Any]) -> bool:
    """Every orders-v2 partition has a position and a recent fetch response."""
    partitions = orders_partitions(state)
    return bool(partitions) and all(
        isinstance(p.get("position"), int) and p.get("last_fetch_seconds_ago") is not None
        and p["last_fetch_seconds_ago"] < RECENT_S for p in partitions.values())


async def test_debug_consumer_shows_each_assigned_partition_fetching(worker: OpsWorker) -> None:
    state = await until(lambda: dump(worker), fetching, what="orders-v2 partitions fetched")
    failed = {name: section for name, section in state.items() if isinstance(section, dict) and "error" in section}
    assert not failed, failed  # every section could be read
    # The only member of its group holds every partition of orders-v2.
    assert set(orders_partitions(state)) == {f"orders-v2:{p}" for p in range(4)}
    for name, p in orders_partitions(state).items():
        assert p["status"] == "CONSUMING" and not p["awaiting_reset"] and not p["paused"], (name, p)
        assert p["position"] >= 0 and (p["highwater"] is None or isinstance(p["highwater"], int)), (name, p)
    coordinator = state["coordinator"]
    assert coordinator["pending_exception"] is None, coordinator
    assert coordinator["generation"] == state["faust"]["consumer_generation_id"] >= 0  # Tansu starts at 0
    assert coordinator["tasks"]["coordination"] == {"done": False}
    assert coordinator["tasks"]["heartbeat"] == {"done": False}
    assert state["fetcher"]["fetch_task"] == {"done": False}
    faust = state["faust"]
    assert faust["flow_active"] and faust["flow_control_active"] and not faust["rebalancing"]
    assert faust["recovery"]["completed"] and not faust["in_recovery"]
    agent = state["agents"]["process_orders"]
    assert agent["actors"] >= 1, agent
    # The queues the drain loop fills: one per topic channel the agents iterate, orders-v2 among them.
    queues = state["agents"]["delivery_queues"]
    assert any("orders-v2" in q["topics"].split(",") and isinstance(q["size"], int) for q in queues), queues
    assert isinstance(state["commit_guard"], dict | None), state["commit_guard"]


async def test_sigusr2_logs_the_dump_as_one_json_line(worker: OpsWorker) -> None:
    await until(lambda: dump(worker), fetching, what="orders-v2 partitions fetched")
    start = worker.log.stat().st_size
    worker.child.send_signal(signal.SIGUSR2)
    await wait_for_log(worker.log, "consumer state: ", worker.child, timeout=20, start=start)
    line = next(line for line in worker.log.read_bytes()[start:].decode().splitlines()
                if "consumer state: " in line)
    assert "[WARNING] consumer state: {" in line, line
    state = json.loads(line.split("consumer state: ", 1)[1])
    assert set(orders_partitions(state)) == {f"orders-v2:{p}" for p in range(4)}
    assert state["coordinator"]["pending_exception"] is None
    # The worker carries on: SIGUSR2 no longer means mode's debugger.
    assert worker.child.poll() is None
    assert (await get_json(worker.url + "/health/live"))[0] == 200
