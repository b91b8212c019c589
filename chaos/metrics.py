"""What a chaos run reads from the workers' `/metrics`: counters that must stay zero."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

#: Offset commits a worker made while its committed offset was not the lowest acked one, i.e.
#: past a message nobody finished (faust-streaming #606): each may have lost that message.
COMMITS_PAST_UNACKED = "mse_consumer_commits_past_unacked_total"


def sample_sum(exposition: str, name: str) -> float | None:
    """The sum of the samples called `name` (every label set) in a Prometheus text exposition;
    None if it has none."""
    values = [sample.value for family in text_string_to_metric_families(exposition)
              for sample in family.samples if sample.name == name]
    return sum(values) if values else None


async def scrape(url: str, timeout: float = 10.0) -> str | None:
    """`url`'s `/metrics` text; None if it does not answer (a worker going down, or stalled)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(f"{url}/metrics") as response:
                return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None


@dataclass
class Counted:
    """One counter summed over the workers asked."""

    total: int = 0      # over the workers that export it
    exported_by: int = 0
    unanswered: int = 0  # workers whose /metrics did not answer


async def count_over(urls: Iterable[str], name: str = COMMITS_PAST_UNACKED) -> Counted:
    """Counter `name` summed over the workers at `urls` (a worker without it counts 0)."""
    out = Counted()
    for exposition in await asyncio.gather(*(scrape(url) for url in urls)):
        if exposition is None:
            out.unanswered += 1
            continue
        value = sample_sum(exposition, name)
        if value is not None:
            out.exported_by += 1
            out.total += int(value)
    return out
