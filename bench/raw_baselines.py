"""Raw baselines run as child processes, like the workers they are compared with.

`python -m bench.raw_baselines copy BOOTSTRAP SRC DST N [--fetch-wait-ms 10]`: an aiokafka
consume -> produce loop copying N messages of every partition of SRC, from the beginning, to
the same partition of DST (key, value and headers kept; acks=all, linger 0 like our worker;
the acks of each fetched batch awaited before the next fetch).

`python -m bench.raw_baselines http PORT N`: a plain aiohttp server answering
`GET /table/orders/<key>/` from a dict of N entries shaped like the `orders` table's values.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.workers import PREFILL_KEY_BASE


async def copy(bootstrap: str, src: str, dst: str, n: int, fetch_wait_ms: int) -> None:
    """Copy n messages from src to dst, partition to partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(src, p) for p in sorted(consumer.partitions_for_topic(src) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        copied = 0
        while copied < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            futures = [await producer.send(dst, m.value, key=m.key, partition=tp.partition, headers=list(m.headers))
                       for tp, msgs in batch.items() for m in msgs]
            await asyncio.gather(*futures)
            copied += len(futures)
        print(f"copied {copied}", flush=True)
    finally:
        await producer.stop()
        await consumer.stop()


async def http(port: int, n: int) -> None:
    """Serve n table-shaped entries until killed."""
    from aiohttp import web

    store = {str(PREFILL_KEY_BASE + i): {
        "seq": 1, "p": i % 4, "created": 1_700_000_000_000_000,
        "state": {"id": PREFILL_KEY_BASE + i, "customer_id": i % 1000, "amount_cents": 100 + i % 9000,
                  "currency": "EUR", "status": "pending", "created_at": 1_700_000_000_000_000,
                  "updated_at": 1_700_000_000_000_000, "shipping": None}} for i in range(n)}

    async def lookup(request: web.Request) -> web.Response:
        value = store.get(request.match_info["key"])
        if value is None:
            return web.json_response({"error": "key not found"}, status=404)
        return web.json_response(value)

    app = web.Application()
    app.router.add_get("/table/orders/{key}/", lookup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Run one baseline."""
    parser = argparse.ArgumentParser(prog="python -m bench.raw_baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy")
    c.add_argument("bootstrap")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("n", type=int)
    c.add_argument("--fetch-wait-ms", type=int, default=10)
    h = sub.add_parser("http")
    h.add_argument("port", type=int)
    h.add_argument("n", type=int)
    args = parser.parse_args(argv)
    if args.command == "copy":
        asyncio.run(copy(args.bootstrap, args.src, args.dst, args.n, args.fetch_wait_ms))
    else:
        asyncio.run(http(args.port, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
