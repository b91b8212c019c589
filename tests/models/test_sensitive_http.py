"""Sensitive data over HTTP: the owner's token-checked methods, hostile inputs, and a canary.

One worker (relay, down-conversion, views, cache, web) serves every test here. Customers
get unique canary emails; after every flow has run, the canary must appear in no topic,
Redis value, table, HTTP response (but the authorized owner API's) or log line.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis
from sqlalchemy import select

from app.embedded.process import free_port
from app.kafka import fetched_end_offsets
from app.orm import Database
from app.settings import Settings
from models import Customer, Order, OrderShipping
from tests.kafka import TopicReader
from tests.processes import start_worker, stop
from tests.waiting import until

TOKENS = {"orders": f"tok-orders-{uuid.uuid4().hex}", "billing": f"tok-billing-{uuid.uuid4().hex}"}
CANARY = f"canary-{uuid.uuid4().hex}"

HOSTILE = [
    "' OR '1'='1", "1; DROP TABLE orders", "1 UNION SELECT email FROM customers", "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd", "%00", "%0d%0aSet-Cookie: x=1", "<script>alert(1)</script>", "A" * 5000, "",
    " ", "%ff%fe", "%c3%28", "1e309", "-1", "0x10", "1.5", "\u0969\u0968", "\uff11\uff12", "%25", "%", "%%",
    "null", "{}", "[]", "$(id)", "`id`", "|id", "*", "\u202eevil", "\U0001f600", "a/b", "%2e%2e", ";--",
    "/*", "\x00", "\r\n", "customers.email", "1)--", "9" * 40,
]


@dataclass
class Worker:
    """The worker under test and where to reach it."""

    child: subprocess.Popen[bytes]
    port: int
    log: Path
    redis_url: str


@pytest.fixture(scope="module")
async def worker(settings: Settings, schema: None, redis_url: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Worker]:
    log = tmp_path_factory.mktemp("sensitive") / "worker.log"
    port = free_port()
    child = await start_worker(
        settings, log, APP_ID=f"mse-sensitive-{uuid.uuid4().hex[:8]}", WEB_PORT=str(port),
        REDIS_URL=redis_url, SERVICE_TOKENS=",".join(f"{s}:{t}" for s, t in TOKENS.items()), OWNER_APIS="customers")
    # Key lookups answer 503 until the worker knows who owns each partition.
    await until(lambda: aget(port, "/tables/orders/0/"), lambda r: r[0] != 503, what="routing ready")
    yield Worker(child, port, log, redis_url)
    stop(child)


def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """A raw GET: the path is sent exactly as given (already percent-encoded where needed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Accept", "application/json")
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def aget(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, port, path, token)


@pytest.fixture(scope="module")
async def canary_customers(worker: Worker, settings: Settings) -> list[int]:
    """Customers whose emails are canaries, written by their owner, with orders of their own."""
    owner = Database(settings.database_url_for("customers"), service="customers")
    orders = Database(settings.database_url_for("orders"), service="orders")
    try:
        async with owner.session() as s:
            customers = [Customer(name=f"Canary {i}", email=f"{CANARY}-{i}@example.com") for i in range(3)]
            s.add_all(customers)
        async with owner.session() as s:  # an update, so customers-v1 carries more than creates
            (await s.get_one(Customer, customers[0].id)).name = "Canary zero"
        async with orders.session() as s:
            for c in customers:
                o = Order(customer_id=c.id, amount_cents=1234, currency="EUR")
                o.shipping = OrderShipping(address="1 Canary Wharf", carrier="DHL")
                s.add(o)
        async with orders.session() as s:  # non-owner reads: public columns only
            rows = (await s.execute(select(Customer).where(Customer.id.in_([c.id for c in customers])))).scalars()
            assert {c.name for c in rows} >= {"Canary 1"}
    finally:
        await owner.close()
        await orders.close()
    return [c.id for c in customers]


async def test_the_owner_api_needs_a_valid_token_and_serves_each_caller_the_fields_it_may_read(
        worker: Worker, canary_customers: list[int]) -> None:
    path = f"/services/customers/customers/{canary_customers[1]}/"
    status, body = await aget(worker.port, path)
    assert status == 401 and "error" in json.loads(body)
    assert (await aget(worker.port, path, "not-a-token"))[0] == 401
    # Customer.email names its readers (orders, support): billing may read no sensitive field.
    status, body = await aget(worker.port, path, TOKENS["billing"])
    assert status == 403 and "billing" in json.loads(body)["error"]
    for _, body in [await aget(worker.port, path, TOKENS["billing"]), await aget(worker.port, path)]:
        assert CANARY.encode() not in body
    status, body = await aget(worker.port, path, TOKENS["orders"])
    answer = json.loads(body)
    assert status == 200 and answer["entity"] == "customers" and answer["key"] == str(canary_customers[1])
    assert answer["state"]["email"] == f"{CANARY}-1@example.com" and answer["state"]["name"] == "Canary 1"
    assert (await aget(worker.port, "/services/customers/customers/999999999999/", TOKENS["orders"]))[0] == 404
    # Only the owners OWNER_APIS names answer, only for entities they own with sensitive fields.
    assert (await aget(worker.port, "/services/orders/orders/1/", TOKENS["orders"]))[0] == 404
    assert (await aget(worker.port, "/services/customers/orders/1/", TOKENS["orders"]))[0] == 404


def test_field_readers_override_the_models_declaration() -> None:
    from app.web.owner import owned_entities

    declared = owned_entities("customers", {})["customers"]
    assert declared.readable_by("orders") == ["email"] and declared.readable_by("billing") == []
    overridden = owned_entities("customers", Settings(field_readers="customers.email=billing").field_reader_map())
    assert overridden["customers"].readable_by("billing") == ["email"]
    assert overridden["customers"].readable_by("orders") == []
    with pytest.raises(ValueError, match="entity.column=service"):
        Settings(field_readers="email=orders").field_reader_map()


async def test_owner_read_for_a_caller_is_audited_with_both_names(worker: Worker, canary_customers: list[int],
                                                                 settings: Settings) -> None:
    cid = canary_customers[2]
    assert (await aget(worker.port, f"/services/customers/customers/{cid}/", TOKENS["orders"]))[0] == 200
    async with TopicReader(settings.bootstrap_servers, "access-v1") as reader:
        def audited(ms: list) -> list:  # type: ignore[type-arg]
            return [m.record for m in ms if m.record["entity"] == "customers"
                    and str(cid) in m.record["data"]["keys"] and m.record["data"]["on_behalf_of"] == "orders"]
        [event, *_] = audited(await reader.wait_for(lambda ms: bool(audited(ms)), timeout=30))
    assert event["service"] == "customers"  # the owner read it, for the orders service


def routes(value: str) -> list[tuple[str, str | None]]:
    """Every HTTP route, with `value` as each of its parameters (path segment or query)."""
    seg = quote(value, safe="")
    q = quote(value, safe="")
    out: list[tuple[str, str | None]] = [
        (f"/tables/{seg}/", None),
        (f"/tables/orders/{seg}/", None),
        (f"/tables/orders/?limit={q}", None),
        (f"/tables/orders/?after={q}", None),
        (f"/tables/orders/?prefix={q}", None),
        (f"/tables/orders/1/?max_lag={q}", None),
        (f"/entities/{seg}/1/", None),
        (f"/entities/orders/{seg}/", None),
        (f"/entities/customers/{seg}/", None),
        (f"/services/customers/customers/{seg}/", TOKENS["orders"]),
    ]
    if value.isascii() and value.isprintable() and " " not in value and "#" not in value and "?" not in value:
        out.append((f"/tables/orders/{value}/", None))  # unencoded, as a careless client sends it
    return out


async def test_hostile_inputs_get_4xx_on_every_route_never_500_nor_other_rows(
        worker: Worker, canary_customers: list[int]) -> None:
    assert len(HOSTILE) >= 30
    problems = []
    for value in HOSTILE:
        for path, token in routes(value):
            status, body = await aget(worker.port, path, token)
            text = body.decode(errors="replace")
            if status >= 500 or "Traceback" in text or CANARY in text:
                problems.append((value[:40], path[:80], status, text[:120]))
            elif status >= 400:
                try:
                    assert "error" in json.loads(body)
                except (ValueError, AssertionError):
                    problems.append((value[:40], path[:80], status, "not a JSON error: " + text[:80]))
            elif status == 200 and value and "prefix=" not in path and "after=" not in path:
                # Only list filters may legitimately match nothing and answer 200.
                problems.append((value[:40], path[:80], status, "accepted: " + text[:80]))
            elif status == 200 and "prefix=" in path and any(
                    not item["key"].startswith(value) for item in json.loads(body).get("items", [])):
                # A pagination cursor (`after`) may legitimately return the rows after it; a
                # prefix filter must return nothing but keys with that prefix.
                problems.append((value[:40], path[:80], status, "rows outside the prefix: " + text[:80]))
    assert problems == [], "\n".join(map(str, problems))


async def test_canary_appears_nowhere_but_the_owner_method(worker: Worker, canary_customers: list[int],
                                                           settings: Settings) -> None:
    # Every flow: poison on the input topics (dead letters), cache reads, every web route.
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for topic in ("orders-v2", "customers-v1"):
            await producer.send_and_wait(topic, b"\x00poison, not Avro", key=b"poison")
    finally:
        await producer.stop()
    responses: list[bytes] = []
    for cid in canary_customers:
        await until(lambda: aget(worker.port, f"/entities/customers/{cid}/"),  # noqa: B023
                    lambda r: r[0] == 200, timeout=30, what="customer entity")
        responses.append((await aget(worker.port, f"/entities/customers/{cid}/"))[1])
    for path in ("/tables/", "/tables/orders/?limit=1000", "/tables/customer_orders/?limit=1000",
                 "/tables/orders_by_status/", "/tables/orders_per_minute/", "/metrics", "/health/ready",
                 "/status.json"):
        responses.append((await aget(worker.port, path))[1])
    for cid in canary_customers:
        responses.append((await aget(worker.port, f"/tables/customer_orders/{cid}/"))[1])
    assert not [r[:200] for r in responses if CANARY.encode() in r]

    # Every message on every topic, headers included (dead letters too).
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    topics = [t for t in await admin.list_topics() if not t.startswith("__")]
    await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    leaks = []
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        if not tps:
            await consumer.topics()
            tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Read to the true end of every partition (Tansu's reported end offsets are short by up
        # to a batch; a fetch corrects them), not until the fetches happen to come back empty.
        ends = await fetched_end_offsets(settings.bootstrap_servers, await consumer.end_offsets(tps))
        starts = await consumer.beginning_offsets(tps)
        read = 0
        async with asyncio.timeout(120):
            while any([await consumer.position(tp) < end for tp, end in ends.items()]):
                batch = await consumer.getmany(timeout_ms=300, max_records=5000)
                for tp, msgs in batch.items():
                    for m in msgs:
                        read += 1
                        blob = (m.value or b"") + b"".join(v for _, v in (m.headers or ()))
                        if CANARY.encode() in blob:
                            leaks.append((tp.topic, m.offset))
        assert read >= sum(ends[tp] - starts[tp] for tp in tps) > 0  # every message was looked at
    finally:
        await consumer.stop()
    assert leaks == []
    assert len(topics) >= 5

    # Every Redis value.
    redis = Redis.from_url(worker.redis_url)
    try:
        async for key in redis.scan_iter(match="entity:*", count=1000):
            value = await redis.get(key)
            assert value is None or CANARY.encode() not in value, key
    finally:
        await redis.aclose()

    # Every log line the worker wrote.
    assert CANARY not in worker.log.read_text(errors="replace")
