"""`/tables/orders/` in headless Chromium: the rows are in the DOM and a screenshot is kept as an artifact."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.kafka import ensure_topics
from app.orm import Database
from app.settings import Settings
from app.topology import evented_topics
from tests.processes import ROOT, stop
from tests.web.test_web import Worker, create_orders, get, spawn, visible

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--window-size=1200,900")


@pytest.fixture(scope="module")
async def worker(settings: Settings, schema: None, redis_url: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Worker]:
    """A worker with tables of its own."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium (make test does)")
    await ensure_topics(settings, evented_topics())  # before the worker subscribes: see tests/web/test_web.py
    log = tmp_path_factory.mktemp("browser-worker") / "worker.log"
    w = await spawn(settings, log, f"mse-browser-{uuid.uuid4().hex[:8]}", redis_url)
    yield w
    stop(w.child)


async def chromium(profile: Path, *args: str) -> str:
    """Run headless Chromium to completion; its stdout. Its whole process group is ended after."""
    def run() -> subprocess.CompletedProcess[bytes]:
        """Chromium in a thread: the event loop (and the worker fixture) keeps running."""
        # A session of its own, so the renderer and helper processes can be ended with it.
        child = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out, err = b"", b"timed out"
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


async def test_orders_page_renders_its_rows_in_chromium(worker: Worker, db: Database,
                                                        tmp_path: Path) -> None:
    orders = await create_orders(db, 6, customer_id=7101)
    keys = [str(o.id) for o in orders]
    await visible(worker, keys)
    # Our six orders exactly: ids are consecutive and numeric keys sort numerically.
    url = f"{worker.url}/tables/orders/?after={int(keys[0]) - 1}&limit=6"
    assert (await get(worker.url, "/tables/orders/", accept="text/html")).status == 200

    dom = await chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert "<table>" in dom and "<th>key</th>" in dom
    for key in keys:
        assert f'<td class="key">{key}</td>' in dom, key
    assert "1 &lt;b&gt;Main&lt;/b&gt; St &amp; Co" in dom  # markup in values stays text

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "tables-orders.png"
    shot.unlink(missing_ok=True)
    await chromium(tmp_path / "profile-shot", f"--screenshot={shot}", url)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    # Width and height from the IHDR chunk: the window size asked for.
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 900)

    windows = f"{worker.url}/tables/orders_per_minute/"
    dom = await chromium(tmp_path / "profile-windows", "--dump-dom", windows)
    assert "<th>window start</th>" in dom and "<th>window end</th>" in dom and "+00:00" in dom
    await chromium(tmp_path / "profile-windows-shot", f"--screenshot={ARTIFACTS / 'tables-orders_per_minute.png'}",
                   windows)
