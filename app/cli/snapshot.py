"""`python -m app snapshot [ENTITY…] [--dry-run]`: every live key's current state through the outbox.

Runs as the tables' owner (`DATABASE_URL`, as `init-db`): it writes outbox rows for every
service's entities, which no service role may. The relays publish the rows as they publish
any; see `app/outbox/snapshot.py` for why consumers that are up to date skip them.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg

from app.capture.model import EventedBase, root_models
from app.cli.preflight import StartupError, check_database
from app.cli.progress import Throttled
from app.outbox.snapshot import SnapshotResult, count_entity, snapshot_entity
from app.registry import load_models
from app.settings import Settings


def chosen_roots(names: Sequence[str]) -> list[type[EventedBase]]:
    """The root models of `names` (every root model when empty); StartupError naming an unknown one."""
    roots = {model.__entity__: model for model in root_models()}
    unknown = [name for name in names if name not in roots]
    if unknown:
        raise StartupError(f"snapshot: no entity {unknown[0]!r}; entities: {', '.join(sorted(roots))} "
                           "(MODELS names the modules they are loaded from)")
    return [roots[name] for name in names] if names else [roots[name] for name in sorted(roots)]


async def run_snapshot(settings: Settings, entities: Sequence[str], *, dry_run: bool,
                       quiet: bool = False) -> list[SnapshotResult]:
    """Snapshot `entities` (all when empty); print one line per entity (`quiet`: one line in
    all, for `make dev`); the results."""
    load_models(settings)
    roots = chosen_roots(entities)
    await check_database(settings)
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    results = []
    try:
        for root in roots:
            if dry_run:
                count = await count_entity(conn, root)
                print(f"{root.__entity__}: would publish {count} event(s)")
                results.append(SnapshotResult(root.__entity__, count, count))
                continue
            t0 = time.monotonic()
            line = Throttled()
            result = await snapshot_entity(
                conn, root, lambda r: line.print(f"snapshot {r.entity}: {r.published} key(s) published"))
            results.append(result)
            if quiet:
                continue
            took = time.monotonic() - t0
            rate = f", {result.published / took:,.0f}/s" if took > 0 and result.published else ""
            skipped = result.rows - result.published
            unsequenced = (f"; {skipped} row(s) with no sequence skipped (never written through capture)"
                           if skipped else "")
            print(f"{root.__entity__}: {result.published} event(s) written to the outbox in {took:.1f} s"
                  f"{rate}{unsequenced}")
    finally:
        await conn.close()
    if quiet:
        print("snapshot of the database into the outbox: " + ", ".join(
            f"{r.entity} {r.published}" for r in results), flush=True)
    elif not dry_run:
        print("the relays publish them like any outbox row (`python -m app outbox status` shows what is pending)")
    return results
