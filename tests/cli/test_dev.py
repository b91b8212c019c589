"""`python -m app dev`: the supervisor of the dev stack, on this session's servers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from app.cli.dev import wipe_state
from app.embedded.process import free_port
from app.settings import Settings
from tests.processes import ROOT, app_env
from tests.waiting import until


async def test_a_worker_stopped_by_a_signal_ends_the_dev_stack_cleanly(settings: Settings, schema: None, redis_url: str,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "dev.out"
    env = app_env(settings, REDIS_URL=redis_url, APP_ID=f"mse-dev-{uuid.uuid4().hex[:8]}",
                  WEB_PORT=str(free_port()))
    with open(out, "wb") as sink:
        dev = subprocess.Popen([sys.executable, "-m", "app", "dev", "--data-dir", str(tmp_path / "run"),
                                "--for-seconds", "120"], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        banner = await until(lambda: out.read_text(), lambda text: re.search(r"worker\s+pid (\d+)", text) is not None,
                       timeout=60, what="the dev banner")
        worker = int(re.search(r"worker\s+pid (\d+)", banner).group(1))  # type: ignore[union-attr]
        os.kill(worker, signal.SIGTERM)  # as a signal to the process group would
        assert await until(dev.poll, lambda code: code is not None, timeout=60, what="the dev stack's exit") == 0
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    text = out.read_text()
    assert f"the worker (pid {worker})" in text and "stopping the dev stack" in text, text
    assert "Traceback" not in text, text


def test_the_embedded_broker_is_refused_beside_a_database_of_the_users(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "app", "dev", "--data-dir", str(tmp_path), "--for-seconds", "1"],
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                         "DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/x"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "KAFKA_BROKER" in lines[0] and "DATABASE_URL" in lines[0], done.stderr
    assert not (tmp_path / "postgres").exists()  # refused before starting anything


async def test_every_embedded_run_starts_from_empty_state(tmp_path: Path) -> None:
    """Run 1 writes orders; run 2's database and views are empty again: they never disagree."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "KAFKA_BROKER")}
    env.update(PYTHONPATH=str(ROOT), APP_ID=f"mse-dev-{uuid.uuid4().hex[:8]}", WEB_PORT=str(free_port()))
    counts = []
    try:
        await _two_runs(env, tmp_path, counts)
    finally:
        wipe_state(tmp_path / "run")  # the embedded cluster may live outside tmp_path (as root)
    assert counts[0] > 0 and counts[1] == 0, counts
    assert "starting from empty state" in (tmp_path / "dev-1.out").read_text()


async def _two_runs(env: dict[str, str], tmp_path: Path, counts: list[int]) -> None:
    """Run the embedded dev stack twice, the first time with the demo; count orders in each."""
    import asyncpg

    for run, args in enumerate((["--demo", "--rate", "50"], [])):
        out = tmp_path / f"dev-{run}.out"
        with open(out, "wb") as sink:
            dev = subprocess.Popen([sys.executable, "-m", "app", "dev", "--data-dir", str(tmp_path / "run"),
                                    "--for-seconds", "600", *args], cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
        try:
            text = await until(lambda: out.read_text(), lambda t: "Ctrl-C stops everything" in t, timeout=90,
                               what="the dev banner")
            url = re.search(r"PostgreSQL\s+(\S+)", text).group(1).replace("+asyncpg", "")  # type: ignore[union-attr]

            async def orders() -> int:
                conn = await asyncpg.connect(url)
                try:
                    return int(await conn.fetchval("SELECT count(*) FROM orders"))
                finally:
                    await conn.close()

            counts.append(await until(orders, lambda n: n > 0, timeout=30, what="demo orders") if args
                          else await orders())
        finally:
            dev.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                assert await until(dev.poll, lambda code: code is not None, timeout=60, what="dev stopped") == 0
            finally:
                if dev.poll() is None:  # never wipe under a running stack
                    dev.kill()
                    dev.wait()
