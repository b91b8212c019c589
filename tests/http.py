"""HTTP helpers of the tests: one GET, its status and body."""
from __future__ import annotations

import json
from typing import Any

import aiohttp


async def get_text(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET `url`."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, await response.text()


async def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of GET `url` asking for JSON (with `headers` too)."""
    async with aiohttp.ClientSession(headers={"Accept": "application/json", **(headers or {})}) as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status, json.loads(await response.text())
