"""Real PostgreSQL, Redis and Kafka-protocol servers started from pip packages, for dev and tests.

One module per server (`postgres`, `redis`, `broker`) on the shared process handling in
`process` (start, wait until serving, stop by PID). Nothing happens at import time; the heavy
packages are imported inside the functions that need them. `python -m app.embedded` starts all
three for a manual look.

Example::

    with EmbeddedPostgres.start(tmp / "pg") as pg, EmbeddedRedis.start(tmp / "redis") as redis, \\
            EmbeddedBroker.start(tmp / "kafka") as kafka:
        engine = create_async_engine(pg.url)
        ...
"""

from app.embedded.broker import EmbeddedBroker
from app.embedded.postgres import EmbeddedPostgres
from app.embedded.redis import EmbeddedRedis

__all__ = ["EmbeddedBroker", "EmbeddedPostgres", "EmbeddedRedis"]
