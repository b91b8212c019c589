"""The README's "Add an entity", followed literally in a package of its own: a new service's entity
gets its events, topic, role, cache, `/entities/`, latest-state table, a declared aggregation and
owner API with no edit of the library or of this repository's folders.

Everything runs as the README says and in processes of their own (`init-db`, the worker, the
service's writer), so the test session's own model registry never sees the new model. The
database and the roles are this test's own, dropped at the end.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import avro.io
import avro.schema
import pytest

from app.capture.roles import service_url
from app.embedded.process import free_port
from app.settings import Settings
from tests.http import get_json
from tests.kafka import TopicReader
from tests.processes import ROOT, app_env, start_worker, stop
from tests.waiting import until

README = (ROOT / "README.md").read_text()
SERVICES = ("orders", "customers", "billing", "worker", "catalog")
TOKEN = f"tok-purchasing-{uuid.uuid4().hex}"

WRITER = """
import asyncio
from app.orm import Database
from app.registry import load_models
from app.settings import Settings

async def main() -> None:
    settings = Settings.from_env()
    load_models(settings)
    from catalog.models import Product
    db = Database(settings.database_url_for("catalog"), service="catalog")
    try:
        async with db.session() as s:
            kept = Product(name="Widget", category="tools", supplier_cost_cents=123)
            gone = Product(name="Gadget", category="tools", supplier_cost_cents=5)
            toy = Product(name="Yo-yo", category="toys", supplier_cost_cents=1)
            s.add_all([kept, gone, toy])
        async with db.session() as s:
            (await s.get_one(Product, kept.id)).name = "Widget II"
            await s.delete(await s.get_one(Product, gone.id))
        print(kept.id, gone.id)
    finally:
        await db.close()

asyncio.run(main())
"""


def readme_model(entity: str) -> str:
    """The model of the README's "Add an entity", with its entity and table named `entity`."""
    section = README[README.index("## Add an entity"):README.index("## Architecture")]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README's Add an entity has no model"
    return "from __future__ import annotations\n\n" + re.sub(r"^   ", "", code.group(1), flags=re.M).replace(
        '"products"', f'"{entity}"')


def schema(entity: str) -> dict[str, object]:
    """The README's step 2: the invoices envelope, with a `data` record of the evented columns."""
    raw = json.loads((ROOT / "schemas" / "invoices" / "v1.avsc").read_text())
    raw["name"], raw["namespace"] = "ProductEvent", f"events.{entity}.v1"
    data = next(f for f in raw["fields"] if f["name"] == "data")
    data["type"] = ["null", {"type": "record", "name": "Product", "fields": [
        {"name": "id", "type": "long"}, {"name": "name", "type": "string"},
        {"name": "category", "type": "string"}]}]
    return raw


@pytest.fixture
async def own_database(pg_server_url: str) -> AsyncIterator[tuple[str, str]]:
    """(admin URL, role prefix) of a database and roles of this test's own, dropped after."""
    base = pg_server_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    name, prefix = f"mse_recipe_{uuid.uuid4().hex[:8]}", f"mse_r{uuid.uuid4().hex[:6]}_"
    conn = await asyncpg.connect(base)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    yield pg_server_url.rsplit("/", 1)[0] + "/" + name, prefix
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for service in SERVICES:
            await conn.execute(f'DROP ROLE IF EXISTS "{prefix}{service}"')
    finally:
        await conn.close()


async def run(args: list[str], env: dict[str, str]) -> str:
    """A child `python <args>` that must succeed; its stdout."""
    child = await asyncio.create_subprocess_exec(sys.executable, *args, cwd=ROOT, env=env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()[-3000:]
    return out.decode()


async def test_a_new_services_entity_gets_everything_with_no_library_edit(
        own_database: tuple[str, str], kafka: Settings, redis_url: str, tmp_path: Path) -> None:
    url, prefix = own_database
    entity = f"products_{uuid.uuid4().hex[:6]}"
    # 1 and 2: the model and its schema, in the service's own package.
    package = tmp_path / "catalog"
    (package / "schemas" / entity).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(readme_model(entity))
    (package / "schemas" / entity / "v1.avsc").write_text(json.dumps(schema(entity)))
    # 3 and 4: registration and the role URLs (no passwords: this machine's PostgreSQL trusts).
    settings = Settings(database_url=url, kafka_broker=kafka.kafka_broker, db_role_prefix=prefix,
                        service_database_urls=tuple((s, service_url(url, f"{prefix}{s}")) for s in SERVICES))
    extra = {"MODELS": "models,catalog.models", "PYTHONPATH": f"{tmp_path}:{ROOT}", "REDIS_URL": redis_url}
    env = app_env(settings, **extra)
    checked = await run(["-m", "app", "schemas", "check"], env)  # the package's schemas/ is on the path
    assert f"{entity} v1: only version" in checked and "models: every column is in its schema" in checked
    made = await run(["-m", "app", "init-db"], env)
    assert f"{prefix}catalog" in made
    # 5: the owner API, served by the worker here; the purchasing service may read the cost.
    port = free_port()
    worker = await start_worker(settings, tmp_path / "worker.log", APP_ID=f"mse-recipe-{uuid.uuid4().hex[:8]}",
                                WEB_PORT=str(port), OWNER_APIS="catalog", SERVICE_TOKENS=f"purchasing:{TOKEN}",
                                **extra)
    try:
        kept, gone = map(int, (await run(["-c", WRITER], env)).split())
        base = f"http://127.0.0.1:{port}"
        # Its events, on its own topic, decodable by Apache avro from its .avsc alone.
        topic = f"{entity}-v1"
        async with TopicReader(kafka.bootstrap_servers, topic, decode=False) as reader:
            messages = await reader.wait_for(lambda ms: len([m for m in ms if m.key == str(kept)]) >= 2, 60)
        parsed = avro.schema.parse(json.dumps(schema(entity)))
        records = [avro.io.DatumReader(parsed).read(avro.io.BinaryDecoder(io.BytesIO(m.value)))
                   for m in messages if m.key == str(kept)]
        assert [(r["op"], r["sequence"], r["service"]) for r in records] == [
            ("create", 1, "catalog"), ("update", 2, "catalog")]
        assert records[-1]["data"] == {"id": kept, "name": "Widget II", "category": "tools"}  # no cost, no search text
        # Its cache and /entities (the worker's role reads the evented columns alone).
        state = await until(lambda: get_json(f"{base}/entities/{entity}/{kept}/"),
                            lambda r: r[0] == 200 and r[1]["state"]["name"] == "Widget II", timeout=60,
                            what="the entity through the cache")
        assert set(state[1]["state"]) == {"id", "name", "category"}
        assert (await get_json(f"{base}/entities/{entity}/{gone}/"))[0] == 404
        # Its latest-state table.
        row = await until(lambda: get_json(f"{base}/tables/{entity}/{kept}/"),
                          lambda r: r[0] == 200 and r[1]["value"]["name"] == "Widget II", timeout=60,
                          what="the entity's latest-state table")
        assert "supplier_cost_cents" not in json.dumps(row[1])
        # Its aggregation: products per category, the deleted one taken out again.
        tools = await until(lambda: get_json(f"{base}/tables/products_by_category/tools/"),
                            lambda r: r[0] == 200 and r[1]["value"] == 1, timeout=60,
                            what="the declared aggregation")
        assert tools[1]["table"] == "products_by_category"
        # Another key: its update may travel on another partition and come after tools' last one.
        await until(lambda: get_json(f"{base}/tables/products_by_category/toys/"),
                    lambda r: r[0] == 200 and r[1]["value"] == 1, timeout=60, what="the aggregation's other key")
        listed = (await get_json(f"{base}/tables/"))[1]["tables"]
        assert {"name": "products_by_category", "kind": "count per category"}.items() <= next(
            t for t in listed if t["name"] == "products_by_category").items()
        # Its owner API: the sensitive field for the service allowed to read it, nobody else.
        owner_api = f"{base}/services/catalog/{entity}/{kept}/"
        status, body = await get_json(owner_api, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and body["state"]["supplier_cost_cents"] == 123
        assert (await get_json(owner_api))[0] == 401
        # Its role: the catalog service writes it; no other service may.
        conn = await asyncpg.connect(service_url(settings.asyncpg_dsn, f"{prefix}orders"))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f'UPDATE "{entity}" SET name = $1', "stolen")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f'SELECT supplier_cost_cents FROM "{entity}" LIMIT 1')
        finally:
            await conn.close()
    finally:
        stop(worker)
