"""Run every benchmark and print one markdown table: `python -m bench.run [--quick] [--only ...]`.

PostgreSQL comes from DATABASE_URL when set (a fresh `bench_<random>` database is created on
it and dropped at the end), else an embedded one is started; the Tansu broker is always
embedded. Every server started here is stopped at the end. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from bench import (
    cache,
    catchup,
    downconvert,
    freshness,
    inbox,
    latency,
    orm_writes,
    relay_throughput,
    restart,
    snapshot,
    views,
)
from bench.common import (
    OTHER_CPU,
    Config,
    Env,
    Line,
    create_schema,
    fresh_database,
    markdown_table,
    median,
    note,
    servers,
)
from bench.workers import StreamConfig

BENCHMARKS = {"orm": orm_writes.run, "latency": latency.run, "relay": relay_throughput.run,
              "downconvert": downconvert.run, "views": views.run, "cache": cache.run,
              "catchup": catchup.run, "freshness": freshness.run, "restart": restart.run, "inbox": inbox.run,
              "snapshot": snapshot.run}


async def _main(server_url: str, broker: object, external: bool, cfg: Config, only: list[str]) -> list[Line]:
    lines: list[Line] = []
    async with fresh_database(server_url) as url:
        env = Env(url, broker, external)  # type: ignore[arg-type]
        await create_schema(env)
        for name in only:
            t0 = time.monotonic()
            note(f"--- {name} ---")
            lines += await BENCHMARKS[name](env, cfg)
            note(f"--- {name} done in {time.monotonic() - t0:.1f} s ---")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="run only these benchmarks")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = Config.make(args.quick)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    with servers() as (server_url, broker, external):
        lines = asyncio.run(_main(server_url, broker, external, cfg, args.only))
    note(f"total {time.monotonic() - t0:.1f} s")
    print()
    scfg = StreamConfig.make(cfg.quick)
    print(f"Benchmarks ({'quick' if cfg.quick else 'full'}; medians of {cfg.orm_rounds}/"
          f"{cfg.latency_rounds}/{cfg.relay_rounds} rounds for ORM/latency/relay, {scfg.downconvert_rounds}/"
          f"{scfg.views_rounds}/{scfg.cache_rounds} for downconvert/views/cache; {os.cpu_count()} CPUs; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{time.monotonic() - t0:.0f} s)")
    print()
    print(markdown_table(lines))
    if OTHER_CPU:
        print()
        print(f"Noise: processes outside this benchmark used median {median(OTHER_CPU):.2f}, max "
              f"{max(OTHER_CPU):.2f} of {os.cpu_count()} CPUs during the measurements.")
    met = all(line.check is None or line.check(line.ours, line.ratio) for line in lines)
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
