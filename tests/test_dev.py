"""`python -m app dev`: the supervisor of the dev stack, on this session's servers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from app.embedded import free_port
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
