"""A whole system of its own for a fault test: embedded PostgreSQL, Redis and Tansu, workers and billing.

Everything here is started by the stack and stopped by PID when it stops, so faults can kill,
pause and restart any part without touching the machine's shared servers. The stack is also
the workers' supervisor, as Docker Compose's `restart: unless-stopped` or Kubernetes is in
production: a worker that exits by itself (the worker exits non-zero on a stall it cannot
heal) is started again a second later, and the exit is counted in `Stack.self_exits`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import models  # noqa: F401  # registers the entity models, whose owners get roles
from app.capture.roles import service_urls
from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.embedded.process import free_port
from app.embedded.redis import EmbeddedRedis
from app.orm import EventedBase
from app.settings import Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = b"[^Worker]: Ready"
#: What `python -m services billing` logs once its web server is up (its inbox starts right after).
BILLING_READY_LINE = b"billing web server on"


class StackError(RuntimeError):
    """A part of the stack did not start or stop; the message names it and its log."""


@dataclass
class Process:
    """One `python -m <module> <command>` process: a worker (`app worker`: Faust agents, views,
    cache refresh and the relay), or the billing service (`services billing`)."""

    name: str
    port: int
    log: Path
    env: dict[str, str]
    command: str = "worker"
    module: str = "app"
    ready_line: bytes = READY_LINE
    #: Started again by the stack when it exits by itself (see `Stack.self_exits`).
    supervised: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0
    _down_on_purpose: bool = False  # kill() or stop(): the supervisor leaves it down

    @property
    def title(self) -> str:
        """How errors name it: "worker w1", "billing"."""
        return self.name if self.name == self.command else f"{self.command} {self.name}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exited_by_itself(self) -> bool:
        """It was started and has exited, and not by `kill()` or `stop()`."""
        return self.proc is not None and self.proc.poll() is not None and not self._down_on_purpose

    def logged_ready(self) -> bool:
        """Whether the current (or last) start logged that it is ready."""
        return self.ready_line in self.log.read_bytes()[self._log_offset:]

    async def start(self, timeout: float = 90) -> None:
        """Start the process and return once it logs that it is ready."""
        self.spawn()
        if not await self.wait_ready(timeout):
            raise StackError(f"{self.title} not ready in {timeout:.0f} s; see {self.log}")

    def spawn(self) -> None:
        """Start the process (see `wait_ready`)."""
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        self._down_on_purpose = False
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, self.command], cwd=ROOT, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float) -> bool:
        """Whether it logged that it is ready within `timeout` s; StackError if the process exits
        (unless it is supervised: then the stack starts it again, and the wait goes on)."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.logged_ready():
            if not self.supervised and self.proc.poll() is not None:
                raise StackError(f"{self.title} exited with {self.proc.returncode}; see {self.log}")
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def kill(self) -> bool:
        """SIGKILL: a crash, with no chance to commit offsets (or a transaction) or release the relay lock.

        True if a live process was killed by it (its exit status says SIGKILL), else False.
        """
        self._down_on_purpose = True
        if not self.alive:
            return False
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait() == -signal.SIGKILL

    def pause(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is paused); SIGKILL if it has not exited in `grace` s.

        Returns its exit status (-SIGKILL if it had to be killed), None if it was not running.
        """
        self._down_on_purpose = True
        if not self.alive:
            return None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    async def live(self) -> bool:
        """True when the process's web server answers `/health/live`."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                async with session.get(f"{self.url}/health/live") as response:
                    return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def status(self) -> dict[str, Any] | None:
        """The billing service's `/status.json` (its inbox's counts since it started); None if it
        does not answer."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                async with session.get(f"{self.url}/status.json") as response:
                    return await response.json() if response.status == 200 else None  # type: ignore[no-any-return]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None


#: How a worker's log says why its liveness rule ended it (app/ops/liveness.py).
STALLED = "liveness: the consumer is stalled: "


def stall_reason(log: Path) -> str:
    """The reason of the last stall `log` reports ("" if none): in the failure message, so a CI
    run that keeps no logs still says which rule fired."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    at = text.rfind(STALLED)
    if at < 0 or "--- chaos stack:" in text[at:]:
        return ""  # none, or one that an earlier exit already reported
    return text[at + len(STALLED):].split("; exiting with", 1)[0].split("\n", 1)[0][:200]


@dataclass(frozen=True)
class SelfExit:
    """A worker that exited by itself, and was started again by the stack."""

    worker: str
    code: int
    at: float             # wall-clock time (time.time()) the exit was seen
    while_starting: bool  # before it logged ready: a start refused (say PostgreSQL was down)
    log: Path
    #: What the worker's liveness rule said (app/ops/liveness.py), when that was why it exited.
    reason: str = ""

    def __str__(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        why = f": {self.reason}" if self.reason else ""
        return f"{self.worker} exit {self.code} at {when}{' while starting' if self.while_starting else ''}{why}"


@dataclass
class Stack:
    """Embedded servers plus workers and the billing service, all of this stack's own."""

    root: Path
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    broker: EmbeddedBroker
    settings: Settings
    workers: list[Process] = field(default_factory=list)
    billing: Process | None = None
    #: Every exit of a worker by itself (not by a fault's kill or stop), in order.
    self_exits: list[SelfExit] = field(default_factory=list)
    _supervisor: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, root: Path) -> Stack:
        """Start the servers, create the schema and the event topics, then the billing service."""
        root.mkdir(parents=True, exist_ok=True)
        # Acknowledged commits must survive a restart: the load generator counts them as written.
        postgres = EmbeddedPostgres.start(root / "postgres", settings={"synchronous_commit": "on"})
        redis = broker = stack = None
        try:
            redis = EmbeddedRedis.start(root / "redis")
            broker = EmbeddedBroker.start(root / "broker")
            settings = Settings(database_url=postgres.url, kafka_broker=broker.url, redis_url=redis.url,
                                app_id=f"chaos-{uuid.uuid4().hex[:8]}", recovery_consistency_check=False)
            # Every process on its service's role, as `make dev` and Compose run them; the
            # owner URL is `init-db`'s and the checker's (it reads the whole truth).
            settings = settings.with_(service_database_urls=tuple(sorted(
                service_urls(EventedBase, settings.db_role_prefix, settings.database_url).items())))
            stack = cls(root, postgres, redis, broker, settings)
            await stack._prepare()  # billing refuses to start without its tables
            await stack._start_billing()
            stack._supervisor = asyncio.get_running_loop().create_task(stack._supervise())
            return stack
        except BaseException:
            if stack is not None and stack.billing is not None:
                stack.billing.stop()
            for server in (broker, redis):
                if server is not None:
                    server.stop()
            if postgres is not None:
                postgres.remove()
            raise

    async def _prepare(self) -> None:
        from app.cli.preflight import create_topics, init_db

        await init_db(self.settings)  # the tables and the services' roles
        await create_topics(self.settings)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a `python -m app` process of this stack: its servers, not the machine's."""
        # A service's own URL (DATABASE_URL_<SERVICE>) would take it to another database.
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER") and not k.startswith("DATABASE_URL_")}
        env.update(DATABASE_URL=self.settings.database_url, KAFKA_BROKER=self.settings.kafka_broker,
                   REDIS_URL=self.settings.redis_url, APP_ID=self.settings.app_id, RECOVERY_CONSISTENCY_CHECK="0",
                   PYTHONPATH=str(ROOT))
        env.update(self.settings.service_database_env())
        env.update(extra)
        return env

    def worker_env(self, port: int) -> dict[str, str]:
        return self.env(WEB_PORT=str(port), FAUST_DATA_DIR=str(self.root / f"faust-{port}"))

    async def add_worker(self) -> Process:
        """Start one more worker of the same app (same consumer group, same relay lock)."""
        port = free_port()
        worker = Process(f"w{len(self.workers) + 1}", port, self.root / f"worker-{port}.log", self.worker_env(port),
                         supervised=True)
        self.workers.append(worker)
        await worker.start()
        return worker

    async def _start_billing(self) -> None:
        """Start the billing service (`python -m services billing`): it consumes `orders-v2` on its own."""
        port = free_port()
        self.billing = Process("billing", port, self.root / f"billing-{port}.log",
                               self.env(BILLING_WEB_PORT=str(port)), command="billing", module="services",
                               ready_line=BILLING_READY_LINE)
        await self.billing.start(60)

    @property
    def alive_workers(self) -> list[Process]:
        return [w for w in self.workers if w.alive]

    async def live_worker(self, timeout: float = 30.0) -> Process:
        """The first live worker; if none is, the first the supervisor starts again within `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.alive_workers:
            if loop.time() > deadline:
                raise StackError(f"no worker alive for {timeout:.0f} s; see the logs in {self.root}")
            await asyncio.sleep(0.1)
        return self.alive_workers[0]

    async def _supervise(self, poll: float = 0.2, restart_after: float = 1.0) -> None:
        """Start again, `restart_after` s later, every supervised process that exited by itself."""
        while True:
            await asyncio.sleep(poll)
            exited = [(w, w.proc) for w in self.workers if w.supervised and w.exited_by_itself]
            if not exited:
                continue
            for worker, proc in exited:
                assert proc is not None
                gone = SelfExit(worker.name, proc.returncode, time.time(), not worker.logged_ready(), worker.log,
                                stall_reason(worker.log))
                self.self_exits.append(gone)
                log.warning("%s; restarting it in %.0f s (see %s)", gone, restart_after, worker.log)
                with open(worker.log, "a") as out:  # so the worker's own log says where one run ends
                    out.write(f"\n--- chaos stack: {gone}; restarting it in {restart_after:.0f} s ---\n")
            await asyncio.sleep(restart_after)  # a supervisor's back-off (Compose's starts at 100 ms)
            for worker, proc in exited:
                # Unless a fault started or stopped it meanwhile.
                if worker.proc is proc and worker.exited_by_itself:
                    worker.spawn()

    def stop(self) -> None:
        """Stop every worker and the billing service, then every server, by PID."""
        if self._supervisor is not None:
            self._supervisor.cancel()  # it runs on this loop: it cannot restart anything from here on
        for process in [*self.workers, self.billing]:
            if process is not None:
                process.stop()
        self.broker.stop()
        self.redis.stop()
        self.postgres.remove()  # a throw-away cluster: its data goes too (its log stays)
