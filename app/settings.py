"""One typed settings object, read from the environment once."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from collections.abc import Mapping


@dataclass(frozen=True)
class Settings:
    """Everything the worker and services can be configured with.

    Empty URLs mean "not configured": `python -m app dev` then starts an embedded server.
    """

    database_url: str = ""
    kafka_broker: str = ""
    redis_url: str = ""
    service_name: str = "orders"
    web_port: int = 6066
    app_id: str = "microservice-events"
    # Partitions of the topics the relay creates; per-key order holds within a partition.
    topic_partitions: int = 4
    # Relay tuning: rows per fetch, and the poll interval used when NOTIFY is missed.
    relay_batch: int = 2000
    relay_poll_interval: float = 1.0
    # ORM reads are buffered and written as one access event per entity per flush.
    access_flush_interval: float = 0.25
    access_max_keys: int = 5000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from a mapping (default: `os.environ`)."""
        env = os.environ if env is None else env
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            kafka_broker=env.get("KAFKA_BROKER", ""),
            redis_url=env.get("REDIS_URL", ""),
            service_name=env.get("SERVICE_NAME", "orders"),
            web_port=int(env.get("WEB_PORT", "6066")),
            app_id=env.get("APP_ID", "microservice-events"),
        )

    def with_(self, **changes: object) -> "Settings":
        """A copy with some fields changed (tests build theirs this way)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def bootstrap_servers(self) -> str:
        """`host:port[,host:port]` for aiokafka, from `kafka://host:port`."""
        return ",".join(part.removeprefix("kafka://") for part in self.kafka_broker.split(","))

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL in the form asyncpg accepts (no `+asyncpg` driver suffix)."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
