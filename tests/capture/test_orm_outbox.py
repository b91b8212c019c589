"""Writes through EventedBase become Avro events on Kafka, via the outbox and the relay."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import delete, func, select, text, update

from app.orm import Database, SchemaMismatch
from app.outbox.relay import Relay
from app.outbox.store import SHARDS
from app.settings import Settings
from models import Customer, Order, OrderShipping
from tests.kafka import Received, TopicReader
from tests.waiting import until


def new_order(**kw: object) -> Order:
    fields: dict[str, object] = {"customer_id": 7, "amount_cents": 1999, "currency": "EUR"}
    fields.update(kw)
    return Order(**fields)


def keyed(messages: list[Received], key: object) -> list[Received]:
    return [m for m in messages if m.key == str(key)]


async def outbox_count(worker_db: Database) -> int:
    """Events in the outbox (access events left out), read on the relay's role, the one that may."""
    async with worker_db.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM outbox WHERE topic <> 'access-v1'"))).scalar_one()


async def test_commit_publishes_event_decodable_with_apache_avro(db: Database, relay: Relay,
                                                                 settings: Settings) -> None:
    async with db.session() as s:
        order = new_order(amount_cents=4250, currency="USD")
        s.add(order)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        [msg] = keyed(await reader.wait_for(lambda ms: bool(keyed(ms, order.id))), order.id)
    rec = msg.record
    assert uuid.UUID(rec["event_id"]).version == 4
    assert rec["message_version"] == 1
    assert rec["schema_version"] == 2
    assert rec["service"] == "orders"
    assert (rec["entity"], rec["key"], rec["op"], rec["sequence"]) == ("orders", str(order.id), "create", 1)
    assert abs((datetime.now(timezone.utc) - rec["occurred_at"]).total_seconds()) < 30
    data = rec["data"]
    assert (data["id"], data["customer_id"], data["amount_cents"], data["currency"], data["status"]) == (
        order.id, 7, 4250, "USD", "pending")
    assert data["shipping"] is None
    assert data["created_at"] == data["updated_at"] and data["created_at"] <= rec["occurred_at"]
    headers = msg.headers
    assert headers["ce_id"].decode() == rec["event_id"]
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_source"] == b"/services/orders"
    assert headers["ce_type"] == b"orders.create.v2"
    assert headers["ce_dataschema"] == b"urn:microservice-events:schemas:orders:v2"
    assert headers["content-type"] == b"application/avro"
    assert datetime.fromisoformat(headers["ce_time"].decode()) == rec["occurred_at"]


async def test_rollback_publishes_nothing(db: Database, worker_db: Database, relay: Relay, settings: Settings) -> None:
    with pytest.raises(RuntimeError):
        async with db.session() as s:
            doomed = new_order()
            s.add(doomed)
            await s.flush()
            doomed_id = doomed.id
            raise RuntimeError("abort")
    async with db.session() as s:
        marker = new_order()
        s.add(marker)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        # The relay publishes in outbox order and waits for every ack of a batch: had the
        # rolled-back row existed, it would have been acked no later than the marker.
        await reader.wait_for(lambda ms: bool(keyed(ms, marker.id)))
        assert keyed(reader.messages, doomed_id) == []
    assert await _eventually_zero(worker_db)


async def test_bulk_update_of_n_rows_raises_n_events(db: Database, relay: Relay, settings: Settings) -> None:
    customer = 1000 + uuid.uuid4().int % 10**8
    async with db.session() as s:
        orders = [new_order(customer_id=customer, amount_cents=i) for i in range(25)]
        s.add_all(orders)
    async with db.session() as s:
        result = await s.execute(
            update(Order).where(Order.customer_id == customer).values(status="paid"))
        assert result.rowcount == 25
    keys = {str(o.id) for o in orders}
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: sum(m.key in keys and m.record["op"] == "update" for m in ms) >= 25)
        updates = [m for m in reader.for_keys(keys) if m.record["op"] == "update"]
    assert sorted(m.key for m in updates) == sorted(keys)
    assert all(m.record["data"]["status"] == "paid" and m.record["sequence"] == 2 for m in updates)


async def test_bulk_delete_raises_delete_events_with_null_data(db: Database, relay: Relay,
                                                              settings: Settings) -> None:
    customer = 1000 + uuid.uuid4().int % 10**8
    async with db.session() as s:
        orders = [new_order(customer_id=customer) for _ in range(3)]
        s.add_all(orders)
    async with db.session() as s:
        result = await s.execute(delete(Order).where(Order.customer_id == customer))
        assert result.rowcount == 3
    keys = {str(o.id) for o in orders}
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: sum(m.key in keys and m.record["op"] == "delete" for m in ms) >= 3)
    deletes = [m for m in reader.for_keys(keys) if m.record["op"] == "delete"]
    assert all(m.record["data"] is None and m.record["sequence"] == 2 for m in deletes)


async def test_extension_write_raises_parent_event_with_full_state(db: Database, relay: Relay,
                                                                  settings: Settings) -> None:
    async with db.session() as s:
        order = new_order(amount_cents=500)
        order.shipping = OrderShipping(address="1 Quay St", carrier="DHL")
        s.add(order)
    async with db.session() as s:
        shipping = await s.get(OrderShipping, order.id)
        assert shipping is not None
        shipping.tracking_number = "TRK-1"
    async with db.session() as s:
        await s.execute(update(OrderShipping).where(OrderShipping.order_id == order.id)
                        .values(carrier="UPS"))
    async with db.session() as s:
        await s.delete(await s.get(OrderShipping, order.id))
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: len(keyed(ms, order.id)) >= 4)
    events = [m.record for m in keyed(reader.messages, order.id)]
    assert [(e["entity"], e["op"], e["sequence"]) for e in events] == [
        ("orders", "create", 1), ("orders", "update", 2), ("orders", "update", 3), ("orders", "update", 4)]
    assert events[0]["data"]["shipping"] == {"address": "1 Quay St", "carrier": "DHL", "tracking_number": None}
    assert events[1]["data"]["shipping"]["tracking_number"] == "TRK-1"
    assert events[1]["data"]["amount_cents"] == 500  # the parent's full state rides along
    assert events[2]["data"]["shipping"]["carrier"] == "UPS"
    assert events[3]["data"]["shipping"] is None


async def test_concurrent_updates_of_one_order_arrive_in_sequence_order(db: Database, relay: Relay,
                                                                       settings: Settings) -> None:
    async with db.session() as s:
        order = new_order(amount_cents=0)
        s.add(order)

    async def bump(i: int) -> None:
        async with db.session() as s:
            # A stale in-memory copy must not leak into the event: state is read after the lock.
            o = await s.get(Order, order.id)
            assert o is not None
            o.amount_cents = Order.amount_cents + 1  # type: ignore[assignment]
            if i % 5 == 0:
                o.status = "paid"

    await asyncio.gather(*(bump(i) for i in range(50)))
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: len(keyed(ms, order.id)) >= 51)
    events = [m.record for m in keyed(reader.messages, order.id)]
    assert [e["sequence"] for e in events] == list(range(1, 52))
    # State and sequence agree: the n-th update saw n increments.
    assert [e["data"]["amount_cents"] for e in events] == list(range(0, 51))


async def test_late_committing_transaction_with_lower_outbox_id_is_published(
        db: Database, worker_db: Database, relay: Relay, settings: Settings) -> None:
    early = db._sessions()
    order_early = new_order(amount_cents=1)
    early.add(order_early)
    await early.flush()
    # The capture triggers run now instead of at COMMIT: the outbox id is taken now, and
    # this transaction commits last.
    await early.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
    async with db.session() as s:
        order_late = new_order(amount_cents=2)
        s.add(order_late)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: bool(keyed(ms, order_late.id)))
        await early.commit()
        await early.close()
        await reader.wait_for(lambda ms: bool(keyed(ms, order_early.id)))
    assert await _eventually_zero(worker_db)


async def test_one_transaction_raises_one_event_per_aggregate_with_its_committed_state(
        db: Database, relay: Relay, settings: Settings) -> None:
    async with db.session() as s:
        order = new_order(amount_cents=1)
        s.add(order)
        await s.flush()  # a flush, a bulk statement and an extension write: one transaction
        await s.execute(update(Order).where(Order.id == order.id).values(amount_cents=2))
        s.add(OrderShipping(order_id=order.id, address="9 Dock Rd", carrier="DHL"))
        other = new_order(amount_cents=3)
        s.add(other)
    async with db.session() as s:
        (await s.get_one(Order, order.id)).status = "paid"
        await s.flush()
        (await s.get_one(Order, order.id)).status = "shipped"
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: len(keyed(ms, order.id)) >= 2 and bool(keyed(ms, other.id)))
    events = [m.record for m in keyed(reader.messages, order.id)]
    assert [(e["op"], e["sequence"]) for e in events] == [("create", 1), ("update", 2)]
    assert events[0]["data"]["amount_cents"] == 2
    assert events[0]["data"]["shipping"]["address"] == "9 Dock Rd"
    assert events[1]["data"]["status"] == "shipped"
    assert [m.record["data"]["amount_cents"] for m in keyed(reader.messages, other.id)] == [3]


async def test_writes_after_the_triggers_ran_early_still_reach_the_event(
        db: Database, relay: Relay, settings: Settings) -> None:
    # SET CONSTRAINTS ... IMMEDIATE runs the capture triggers at the end of each statement;
    # a later write of the same aggregate must refresh the event already written.
    async with db.session() as s:
        await s.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
        order = new_order(amount_cents=1)
        s.add(order)
        await s.flush()
        await s.execute(update(Order).where(Order.id == order.id).values(amount_cents=2))
        s.add(OrderShipping(order_id=order.id, address="9 Dock Rd", carrier="DHL"))
        await s.flush()
        doomed = new_order(amount_cents=3)
        s.add(doomed)
        await s.flush()
        await s.delete(doomed)
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: bool(keyed(ms, order.id)) and bool(keyed(ms, doomed.id)))
    [event] = [m.record for m in keyed(reader.messages, order.id)]
    assert (event["op"], event["sequence"], event["data"]["amount_cents"]) == ("create", 1, 2)
    assert event["data"]["shipping"]["carrier"] == "DHL"
    # Created and deleted in one transaction: consumers get a tombstone for a key they never saw.
    assert [(m.record["op"], m.record["data"]) for m in keyed(reader.messages, doomed.id)] == [("delete", None)]


async def test_data_outside_schema_fails_flush_naming_entity_field_version(db: Database, worker_db: Database) -> None:
    with pytest.raises(SchemaMismatch) as err:
        async with db.session() as s:
            s.add(new_order(status="lost"))
    assert "orders" in str(err.value) and "'status'" in str(err.value) and "v2" in str(err.value)
    with pytest.raises(SchemaMismatch, match=r"orders: field 'shipping.carrier' .* v2"):
        async with db.session() as s:
            o = new_order()
            o.shipping = OrderShipping(address="x", carrier=42)  # type: ignore[arg-type]
            s.add(o)
    with pytest.raises(SchemaMismatch, match="amount_cents"):
        async with db.session() as s:
            s.add(new_order(amount_cents=2**70))
    async with worker_db.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one() == 0
        assert (await conn.execute(text("SELECT count(*) FROM orders WHERE status='lost'"))).scalar_one() == 0


async def test_sensitive_column_never_enters_the_event(db: Database, relay: Relay, settings: Settings) -> None:
    canary = f"canary-{uuid.uuid4().hex}@example.com"
    customers = Database(settings.database_url_for("customers"), service="customers")
    async with customers.session() as s:
        customer = Customer(name="Ada", email=canary)
        s.add(customer)
    await customers.close()
    async with TopicReader(settings.bootstrap_servers, "customers-v1") as reader:
        [msg] = keyed(await reader.wait_for(lambda ms: bool(keyed(ms, customer.id))), customer.id)
    assert msg.record["data"]["name"] == "Ada"
    assert "email" not in msg.record["data"]
    assert canary.encode() not in msg.value


async def test_reads_raise_batched_access_events(db: Database, relay: Relay, settings: Settings) -> None:
    async with db.session() as s:
        orders = [new_order() for _ in range(3)]
        s.add_all(orders)
    ids = [o.id for o in orders]
    async with db.session() as s:
        rows = (await s.execute(select(Order).where(Order.id.in_(ids)))).scalars().all()
        assert len(rows) == 3
    async with TopicReader(settings.bootstrap_servers, "access-v1") as reader:
        want = {str(i) for i in ids}
        await reader.wait_for(lambda ms: any(want <= set(m.record["data"]["keys"]) for m in ms))
    [event] = [m.record for m in reader.messages if want <= set(m.record["data"]["keys"])]
    assert (event["service"], event["entity"], event["op"]) == ("orders", "orders", "read")


async def test_broker_paused_while_writing_delivers_every_event(db: Database, worker_db: Database, relay: Relay,
                                                               settings: Settings, broker) -> None:  # type: ignore[no-untyped-def]
    ids: list[int] = []

    async def write(n: int) -> None:
        for _ in range(n):
            async with db.session() as s:
                o = new_order()
                s.add(o)
            ids.append(o.id)

    await write(20)
    broker.pause()
    try:
        await write(100)  # commits keep succeeding while the broker is frozen
        assert len(ids) == 120
    finally:
        broker.resume()
    keys = {str(i) for i in ids}
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: keys <= {m.key for m in ms}, timeout=60)
    assert await _eventually_zero(worker_db)


async def _eventually_zero(worker_db: Database, timeout: float = 10) -> bool:
    await until(lambda: outbox_count(worker_db), lambda n: n == 0, timeout, "empty outbox")
    return True


async def test_two_relays_split_the_shards_and_the_survivor_takes_them_all(
        db: Database, worker_db: Database, relay: Relay, settings: Settings) -> None:
    await until(lambda: relay.stats.active)
    second = Relay(settings, standby_poll=0.05)
    task = asyncio.get_running_loop().create_task(second.run())
    try:
        def split() -> bool:
            a, b = set(relay.stats.shards), set(second.stats.shards)
            return bool(a) and bool(b) and not a & b and a | b == set(range(SHARDS))
        # The first relay held every shard; it gives half back to the relay that joined.
        await until(lambda: split(), timeout=10, what="both relays holding half of the shards")
        assert len(relay.stats.shards) == len(second.stats.shards) == SHARDS // 2
        async with db.session() as s:
            s.add_all([new_order() for _ in range(64)])  # 64 keys: both relays' shards get some
        assert await _eventually_zero(worker_db)
        assert relay.stats.published >= 1 and second.stats.published >= 1
        relay.stop()  # its session ends and with it its locks: the survivor takes every shard
        await until(lambda: second.stats.shards == tuple(range(SHARDS)), timeout=10,
                    what="the surviving relay holding every shard")
        published = second.stats.published
        async with db.session() as s:
            s.add_all([new_order() for _ in range(16)])
        assert await _eventually_zero(worker_db)
        assert second.stats.published >= published + 16
    finally:
        second.stop()
        await asyncio.wait_for(task, 10)


async def test_session_count_query_works_with_events(db: Database) -> None:
    async with db.session() as s:
        s.add(new_order())
        await s.flush()
        assert (await s.execute(select(func.count()).select_from(Order))).scalar_one() >= 1


async def test_a_re_created_key_keeps_counting_its_sequence_up(db: Database, worker_db: Database) -> None:
    key = 9_000_000_000 + uuid.uuid4().int % 1_000_000_000  # an id no other test draws
    async with db.session() as s:
        s.add(new_order(id=key))
    async with db.session() as s:
        await s.delete(await s.get_one(Order, key))
    async with db.session() as s:
        s.add(new_order(id=key, amount_cents=1))
    async with worker_db.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT op, sequence FROM outbox WHERE entity = 'orders' AND key = :k ORDER BY id"),
            {"k": str(key)})).all()
    # Consumers that drop sequences at or below the last applied one must see the second
    # life of the key as newer than the first.
    assert [tuple(r) for r in rows] == [("create", 1), ("delete", 2), ("create", 3)]


async def test_an_unencodable_outbox_row_reaches_outbox_dlq_and_the_rest_still_publish(
        db: Database, worker_db: Database, relay: Relay, settings: Settings) -> None:
    async with db.engine.begin() as conn:
        # A row no ORM write produces: its state breaks the schema (a string amount).
        bad_key = f"bad-{uuid.uuid4().hex[:8]}"
        await conn.execute(text(
            "INSERT INTO outbox (topic, entity, schema_version, key, op, service, sequence, data) "
            "VALUES ('orders-v2', 'orders', 2, :k, 'update', 'orders', 1, "
            "'{\"id\": 1, \"amount_cents\": \"lots\"}')"), {"k": bad_key})
    async with db.session() as s:
        good = new_order()
        s.add(good)
    async with TopicReader(settings.bootstrap_servers, "outbox.dlq", decode=False) as dlq:
        [letter] = [m for m in await dlq.wait_for(lambda ms: any(m.key == bad_key for m in ms))
                    if m.key == bad_key]
    body = json.loads(letter.value)
    data = json.loads(body["data"]) if isinstance(body["data"], str) else body["data"]  # the row's json, as stored
    assert (body["key"], body["topic"], data["amount_cents"]) == (bad_key, "orders-v2", "lots")
    # The agents' dead-letter headers: the error named, the topic it was meant for, the row.
    assert letter.headers["dlq_source_topic"] == b"orders-v2" and letter.headers["dlq_error_class"]
    assert letter.headers["dlq_error_message"] and letter.headers["dlq_outbox_id"] == str(body["id"]).encode()
    async with TopicReader(settings.bootstrap_servers, "orders-v2") as reader:
        await reader.wait_for(lambda ms: bool(keyed(ms, good.id)))
    await until(lambda: outbox_count(worker_db), lambda n: n == 0, what="outbox drained, dead letter included")
