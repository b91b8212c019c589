"""Readiness: why the worker should not get traffic yet (`/health/ready`, `mse_ready`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import faust

if TYPE_CHECKING:
    from app.ops.watchdog import Watchdog
    from app.outbox.relay_host import RelayHost


def not_ready(app: faust.App, relay: RelayHost | None, watchdog: Watchdog | None) -> list[str]:
    """Why the worker should not get traffic yet; [] when it is ready."""
    reasons = []
    recovery = app.tables.recovery  # type: ignore[attr-defined]  # on TableManager, not TableManagerT
    if not recovery.completed.is_set():
        reasons.append("tables: changelog recovery has not completed")
    elif recovery.in_recovery:
        reasons.append(f"tables: recovering, {recovery.active_remaining_total()} changelog messages left")
    if app.rebalancing:
        reasons.append("consumer group is rebalancing")
    if relay is not None and not relay.stats.connected:
        reasons.append(f"relay: not connected to PostgreSQL ({relay.stats.error or 'not started yet'})")
    if watchdog is not None:
        if watchdog.liveness.stalled:
            reasons.append(f"consumer: stalled: {watchdog.liveness.stalled}; restarting the worker")
        failing = watchdog.failing()
        for name, why in sorted(failing.items()):
            reasons.append(f"agent {name}: {why}")
        for name, why in sorted(watchdog.stuck().items()):
            if name not in failing:
                reasons.append(f"agent {name}: stuck: {why}")
    return reasons
