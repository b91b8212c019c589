"""The `/status` page in headless Chromium draws the pipeline's events/s from a real worker under load."""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.embedded.process import free_port
from app.kafka import ensure_topics
from app.orm import Database
from app.settings import Settings
from app.topology import evented_topics
from models import Order
from tests.processes import ROOT, start_worker, stop
from tests.waiting import until

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
async def worker_url(settings: Settings, schema: None, redis_url: str,
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A worker with a group of its own; its web server's base URL."""
    await ensure_topics(settings, evented_topics())
    log = tmp_path_factory.mktemp("status-worker") / "worker.log"
    port = free_port()
    child = await start_worker(settings, log, APP_ID=f"mse-status-{uuid.uuid4().hex[:8]}",
                               WEB_PORT=str(port), REDIS_URL=redis_url)
    yield f"http://127.0.0.1:{port}"
    stop(child)


class ChartReader(HTMLParser):
    """Collects the chart's attributes and its series' points from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.chart: dict[str, str] = {}
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.badge = ""
        self._in_badge = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Record svg#chart and its polylines."""
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and a.get("id") == "chart":
            self.chart = a
        elif tag == "polyline" and "data-series" in a:
            self.series[a["data-series"]] = [tuple(map(float, p.split(","))) for p in a["points"].split()]  # type: ignore[misc]
        self._in_badge = a.get("id") == "badge"

    def handle_endtag(self, tag: str) -> None:
        """Leave the badge."""
        self._in_badge = False

    def handle_data(self, data: str) -> None:
        """Record the readiness badge's text."""
        if self._in_badge:
            self.badge += data


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium once (what `scripts/ensure-chromium` installs)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={user_data}",
         "--virtual-time-budget=5000", "--window-size=1200,900", *args],
        capture_output=True, timeout=60, check=False)


async def test_status_page_charts_events_per_second_of_every_stage(
        worker_url: str, db: Database, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium")
    stop_load = asyncio.Event()

    async def load() -> None:
        """Orders through the ORM until the browser is done: the chart shows live traffic."""
        i = 0
        while not stop_load.is_set():
            async with db.session() as s:
                s.add_all([Order(customer_id=9300 + i % 50, amount_cents=100 + j, currency="EUR") for j in range(10)])
            i += 1
            await asyncio.sleep(0.1)

    writer = asyncio.create_task(load())
    try:
        await _check_page(worker_url, tmp_path)
    finally:
        stop_load.set()
        await writer
    # Let the worker catch up before it is stopped (Faust's shutdown waits for unfinished
    # events). Only a courtesy to the teardown, not an outcome: lag read from Tansu's end
    # offsets can stay above 0 by up to a batch.
    with contextlib.suppress(AssertionError):
        await until(lambda: status(worker_url), lambda body: all(a["lag"] == 0 and a["in_flight"] == 0
                                                                for a in body["agents"].values()),
                    timeout=15, what="agents caught up")


async def status(worker_url: str) -> dict[str, Any]:
    """The worker's /status.json."""
    async with aiohttp.ClientSession() as session:
        async with session.get(worker_url + "/status.json") as response:
            assert response.status == 200
            return await response.json()  # type: ignore[no-any-return]


async def _check_page(worker_url: str, tmp_path: Path) -> None:
    """Wait for traffic in the worker's status history, then render the page and read its chart."""

    async def history() -> list[dict[str, float]]:
        return (await status(worker_url))["history"]  # type: ignore[no-any-return]

    # Every stage's traffic, waited for: the worker may first work off orders-v2 events an earlier
    # test's relay published, before its own relay child has reported a single batch.
    await until(history, lambda h: len(h) >= 3 and all(max(p[stage] for p in h) > 0
                                                       for stage in ("relay", "downconvert", "views")),
                timeout=30, what="status history with traffic on the relay, down-conversion and views")

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    dumped, shot = await asyncio.gather(
        asyncio.to_thread(chromium, "--dump-dom", worker_url + "/status", user_data=tmp_path / "dom"),
        asyncio.to_thread(chromium, f"--screenshot={screenshot}", worker_url + "/status", user_data=tmp_path / "shot"))
    assert dumped.returncode == 0, dumped.stderr.decode(errors="replace")[-2000:]
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr.decode(errors="replace")[-2000:]

    page = ChartReader()
    page.feed(dumped.stdout.decode())
    assert int(page.chart.get("data-points", "0")) >= 3, page.chart
    assert float(page.chart["data-peak"]) > 0
    assert set(page.series) == {"relay", "downconvert", "views", "cache"}
    for name, points in page.series.items():
        assert len(points) >= 3, (name, points)
    # Points above the zero line (SVG y grows downwards): traffic was drawn, not just axes.
    zero = float(page.chart["data-zero"])
    for name in ("relay", "views"):
        assert any(y < zero for _, y in page.series[name]), (name, zero, page.series[name])
    assert page.badge == "ready"

    # The first response already holds the figures: saved and opened from a file, where its
    # fetch of /status.json cannot succeed, the page still paints the chart and the agents.
    async with aiohttp.ClientSession() as session:
        async with session.get(worker_url + "/status") as response:
            html = await response.text()
    saved = tmp_path / "status.html"
    saved.write_text(html)
    offline = ARTIFACTS / "status-page-first-paint.png"
    dumped, shot = await asyncio.gather(
        asyncio.to_thread(chromium, "--dump-dom", saved.as_uri(), user_data=tmp_path / "dom-offline"),
        asyncio.to_thread(chromium, f"--screenshot={offline}", saved.as_uri(), user_data=tmp_path / "shot-offline"))
    assert dumped.returncode == 0 and shot.returncode == 0 and offline.stat().st_size > 10_000
    first = ChartReader()
    first.feed(dumped.stdout.decode())
    assert int(first.chart.get("data-points", "0")) >= 3 and float(first.chart["data-peak"]) > 0, first.chart
    assert first.badge == "ready"
    assert "process_orders" in dumped.stdout.decode() and "waiting for data" not in dumped.stdout.decode()


async def test_status_json_has_counters_agents_and_readiness(worker_url: str) -> None:
    # Faust logs "Ready" before the relay has connected: readiness follows within moments
    # (seen when this test ran first, in its own test process, 0.2 s after the worker started).
    body = await until(lambda: status(worker_url), lambda b: b["ready"], what="the worker ready")
    assert set(body["counters"]) == {"relay", "downconvert", "views", "cache"}
    assert body["reasons"] == []
    assert {"rows", "seconds"} <= set(body["outbox"])
    assert body["agents"]["process_orders"]["state"] == "running"
