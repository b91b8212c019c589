"""Wait-for-condition helpers: tests poll for an outcome with a deadline, never sleep blindly."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
#: Polling interval of every wait loop.
POLL = 0.02


async def until(probe: Callable[[], T | Awaitable[T]], check: Callable[[T], bool] = bool,
                timeout: float = 20.0, what: str = "condition") -> T:
    """Poll `probe()` until `check(value)` holds; return the value, or fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if check(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s (last value: {value!r:.200})")
        await asyncio.sleep(POLL)
