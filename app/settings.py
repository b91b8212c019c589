"""One typed settings object, read from the environment once."""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import get_type_hints

LEGACY_MODES = ("dual-publish", "downconvert")
#: Where the worker runs the outbox relay (app/outbox/relay_host.py): a child process it
#: supervises, a thread with its own event loop, the agents' event loop, or not at all
#: (`python -m app relay` processes publish the outbox).
RELAY_MODES = ("process", "thread", "loop", "off")
#: The stream worker's service name and PostgreSQL role (the relay, the cache agent,
#: `/entities`); not an entity owner (app/capture/roles.py).
WORKER = "worker"


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
    # The interface every web server we start binds (the worker's, the relay's, billing's):
    # loopback by default, so nothing is open to the network unless asked for (`0.0.0.0`).
    web_host: str = "127.0.0.1"
    # The host name other workers reach this one at (Faust's canonical URL, used to route
    # table lookups): docker-compose sets the service name. Empty: `web_host`, or the
    # machine's host name when `web_host` is a wildcard (what could another worker dial?).
    web_advertised_host: str = ""
    app_id: str = "microservice-events"
    # Partitions of the topics the relay creates; per-key order holds within a partition.
    topic_partitions: int = 4
    # Overrides of the models' `__legacy__` modes, so switching needs no code change:
    # "orders:1=dual-publish" (entity:version=mode, comma-separated).
    legacy_modes: str = ""
    # Faust hard-codes a 1500 ms fetch wait; Tansu answers a waiting fetch only when it
    # expires, so this wait is the latency of every hop. Ours is a setting (app/transport.py).
    consumer_fetch_max_wait_ms: int = 10
    # The fetch wait while a consumer is behind on a partition (app/kafka.adapt_fetch_wait):
    # Tansu's fetch lists a partition's batches within the wait, and 10 ms lists too few of a
    # deep one to ever deliver (bench/fetch_depth.py).
    consumer_catchup_fetch_wait_ms: int = 250
    # Where a new consumer group starts: "earliest" (every event ever) or "latest".
    consumer_auto_offset_reset: str = "earliest"
    # How long the worker's producer waits to batch sends (changelogs, repartition, v1).
    producer_linger_ms: float = 2.0
    # The largest record batch the worker's producer builds per partition. aiokafka sends one
    # batch per partition per request and waits for its ack before the next, so with Faust's
    # 16 KB default a changelog partition moves ~40 entries per broker round trip.
    producer_max_batch_bytes: int = 512 * 1024
    # Faust table storage: "" (memory) or e.g. "rocksdb://" for tables that outgrow memory.
    table_store: str = ""
    # Faust's data directory (table stores); "" is Faust's default, `<app id>-data` in the cwd.
    data_dir: str = ""
    # Faust refuses to recover a RocksDB table whose stored offset is past the changelog's
    # end. Tansu answers "latest offset" with the start of the last batch, so on Tansu the
    # check misfires after every restart: `python -m app dev` turns it off for its broker.
    recovery_consistency_check: bool = True
    # Per-service bearer tokens for owner services' HTTP methods: "orders:<token>,...".
    service_tokens: str = ""
    # The owner services whose HTTP API (`app/web/owner.py`) this worker serves, e.g. ("customers",).
    owner_apis: tuple[str, ...] = ()
    # Who may read a sensitive field from its owner, overriding the model's declaration:
    # "customers.email=orders|support,products.supplier_cost_cents=purchasing".
    field_readers: str = ""
    # Relay tuning: rows per fetch, and the poll interval used when NOTIFY is missed.
    relay_batch: int = 2000
    relay_poll_interval: float = 1.0
    # While the outbox is busy, the shortest time from one relay batch to the next: commits
    # made meanwhile go out in the same record batches (app/outbox/relay.py). As Kafka's
    # producer `linger.ms` (5 ms by default since Kafka 4.0); a lone commit is not delayed.
    relay_linger_ms: float = 5.0
    # Where the worker runs the outbox relay, one of RELAY_MODES. "process" by default: a child
    # the worker starts and stops, so the relay never waits for a turn of the agents' busy
    # event loop (bench/freshness.py). `RELAY_IN_WORKER=0`, the older spelling, means "off".
    relay_mode: str = "process"
    # The port a standalone relay (`python -m app relay`) serves /metrics and /health on; 0 = none.
    relay_web_port: int = 6067
    # Relay processes `python -m app dev` starts when the worker runs none (RELAY_MODE=off);
    # they divide the outbox shards among themselves, on web ports relay_web_port, +1, ...
    relay_processes: int = 1
    # Static group membership (Kafka's `group.instance.id`, KIP-345): a stable id per worker
    # process, unique in the group (e.g. the pod name of a StatefulSet). A worker restarted with
    # the same id takes its partitions back without waiting for its dead self's session to time
    # out. "" = dynamic membership. See the README (Restart) for what Tansu does with it.
    group_instance_id: str = ""
    # The web server: seconds a request may take to send its headers / its body, and the most
    # connections open at once (app/web/http.py); past them the client gets 408 / 503.
    http_header_timeout: float = 5.0
    http_body_timeout: float = 10.0
    http_max_connections: int = 256
    # Seconds an agent may retry one batch, or finish nothing while its input has lag, before
    # `/health/ready` reports it stuck (it is not restarted for that: see app/ops/health.py).
    stuck_after: float = 30.0
    # Seconds an assigned partition may go unfetched, with no fetch out and nothing waiting for
    # the agents, before the worker counts its consumer as stalled and exits for its supervisor
    # to restart it (app/ops/liveness.py); a broker outage keeps a fetch out, so it is not one.
    stall_after: float = 30.0
    # Seconds an input partition's commit may be held by a message no agent finished, with later
    # ones processed, before the consumer reads the partition again from there (app/commits.py).
    reseek_after: float = 5.0
    # Inbox consumers (app/inbox/): events applied per transaction (when the handler allows
    # batches), attempts of a failing event before it is dead-lettered, how long applied event
    # ids are kept (longer than any redelivery: README, Inbox) and how often they are pruned.
    inbox_batch: int = 100
    inbox_max_attempts: int = 5
    inbox_retention_s: float = 7 * 24 * 3600.0
    inbox_prune_interval_s: float = 60.0
    # The port the billing service (`python -m services billing`) serves /metrics, /health, /status on.
    billing_web_port: int = 6070
    # PostgreSQL roles (app/capture/roles.py): service `orders` is role `<prefix>orders`.
    db_role_prefix: str = "mse_"
    # The modules that define the models (env `MODELS`, comma-separated), imported by
    # `app.registry.load_models`: a service's models may live in its own package.
    models: tuple[str, ...] = ("models",)
    # service -> its own URL (env `DATABASE_URL_<SERVICE>`), connecting as its role; a service
    # without one uses `database_url` (and so that URL's role and its rights).
    service_database_urls: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from a mapping (default: `os.environ`); what it does not set keeps the
        default written above. A value that does not parse is refused naming its variable."""
        env = os.environ if env is None else env
        types = get_type_hints(cls)
        values: dict[str, object] = {name: _parse(var, env[var], types[name])
                                     for var, name in ENV.items() if var in env}
        values["relay_mode"] = _relay_mode(env)
        values["service_database_urls"] = tuple(sorted(
            (name.removeprefix("DATABASE_URL_").lower(), url) for name, url in env.items()
            if name.startswith("DATABASE_URL_") and url))
        return cls(**values)  # type: ignore[arg-type]  # each value parsed to its field's type

    def service_database_env(self) -> dict[str, str]:
        """`service_database_urls` as the environment carries them (`DATABASE_URL_<SERVICE>`),
        for a child process that must connect as the same roles."""
        return {f"DATABASE_URL_{service.upper()}": url for service, url in self.service_database_urls}

    def service_token_map(self) -> dict[str, str]:
        """`service_tokens` parsed: service -> token."""
        out = {}
        for item in filter(None, (part.strip() for part in self.service_tokens.split(","))):
            service, sep, token = item.partition(":")
            if not sep or not service or not token:
                raise ValueError("SERVICE_TOKENS items must be service:token")
            out[service] = token
        return out

    def field_reader_map(self) -> dict[tuple[str, str], frozenset[str]]:
        """`field_readers` parsed: (entity, column) -> the services that may read it."""
        out = {}
        for item in filter(None, (part.strip() for part in self.field_readers.split(","))):
            field, sep, services = item.partition("=")
            entity, dot, column = field.strip().partition(".")
            if not sep or not dot or not entity or not column:
                raise ValueError(f"FIELD_READERS item {item!r} must be entity.column=service|service")
            out[(entity, column)] = frozenset(s.strip() for s in services.split("|") if s.strip())
        return out

    def legacy_overrides(self) -> dict[tuple[str, int], str]:
        """`legacy_modes` parsed: (entity, version) -> "dual-publish" | "downconvert"."""
        out: dict[tuple[str, int], str] = {}
        for item in filter(None, (part.strip() for part in self.legacy_modes.split(","))):
            try:
                target, mode = item.split("=")
                entity, version = target.split(":")
                key = (entity.strip(), int(version))
            except ValueError:
                raise ValueError(f"LEGACY_MODES item {item!r} is not entity:version=mode") from None
            if mode.strip() not in LEGACY_MODES:
                raise ValueError(f"LEGACY_MODES item {item!r}: mode must be one of {LEGACY_MODES}")
            out[key] = mode.strip()
        return out

    @property
    def relay_in_worker(self) -> bool:
        """Whether the worker runs the outbox relay (in any of its modes)."""
        return self.relay_mode != "off"

    def relay_child_env(self) -> dict[str, str]:
        """What a relay child of the worker (`ProcessRelay`) must see in its environment to
        publish as this worker would, whether these settings came from the environment or not."""
        return {"DATABASE_URL": self.database_url, "KAFKA_BROKER": self.kafka_broker,
                "MODELS": ",".join(self.models), "LEGACY_MODES": self.legacy_modes,
                "DB_ROLE_PREFIX": self.db_role_prefix, "RELAY_BATCH": str(self.relay_batch),
                "RELAY_LINGER_MS": str(self.relay_linger_ms),
                "RELAY_WEB_PORT": "0", **self.service_database_env()}

    def with_(self, **changes: object) -> "Settings":
        """A copy with some fields changed (tests build theirs this way)."""
        return replace(self, **changes)  # type: ignore[arg-type]  # field names are checked by dataclasses at run time

    @property
    def advertised_host(self) -> str:
        """The host in this worker's canonical URL (see `web_advertised_host`)."""
        if self.web_advertised_host:
            return self.web_advertised_host
        if self.web_host in ("", "0.0.0.0", "::"):
            return socket.gethostname()
        return self.web_host

    @property
    def bootstrap_servers(self) -> str:
        """`host:port[,host:port]` for aiokafka, from `kafka://host:port`."""
        return ",".join(part.removeprefix("kafka://") for part in self.kafka_broker.split(","))

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL in the form asyncpg accepts (no `+asyncpg` driver suffix)."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def database_url_for(self, service: str) -> str:
        """The URL `service` connects with: its own (`DATABASE_URL_<SERVICE>`), else the shared one."""
        return dict(self.service_database_urls).get(service, self.database_url)

    def asyncpg_dsn_for(self, service: str) -> str:
        """`database_url_for(service)` in the form asyncpg accepts."""
        return self.database_url_for(service).replace("postgresql+asyncpg://", "postgresql://", 1)


#: Environment variable -> the field it sets (its type says how the value is parsed).
ENV = {
    "DATABASE_URL": "database_url", "KAFKA_BROKER": "kafka_broker", "REDIS_URL": "redis_url",
    "SERVICE_NAME": "service_name", "WEB_PORT": "web_port", "WEB_HOST": "web_host",
    "WEB_ADVERTISED_HOST": "web_advertised_host", "APP_ID": "app_id", "LEGACY_MODES": "legacy_modes",
    "TABLE_STORE": "table_store", "FAUST_DATA_DIR": "data_dir",
    "RECOVERY_CONSISTENCY_CHECK": "recovery_consistency_check", "SERVICE_TOKENS": "service_tokens",
    "OWNER_APIS": "owner_apis", "FIELD_READERS": "field_readers",
    "CONSUMER_FETCH_MAX_WAIT_MS": "consumer_fetch_max_wait_ms",
    "CONSUMER_CATCHUP_FETCH_WAIT_MS": "consumer_catchup_fetch_wait_ms",
    "CONSUMER_AUTO_OFFSET_RESET": "consumer_auto_offset_reset", "PRODUCER_LINGER_MS": "producer_linger_ms",
    "PRODUCER_MAX_BATCH_BYTES": "producer_max_batch_bytes", "RELAY_WEB_PORT": "relay_web_port",
    "RELAY_PROCESSES": "relay_processes", "RELAY_BATCH": "relay_batch", "RELAY_LINGER_MS": "relay_linger_ms",
    "STUCK_AFTER_S": "stuck_after", "STALL_AFTER_S": "stall_after", "RESEEK_AFTER_S": "reseek_after",
    "GROUP_INSTANCE_ID": "group_instance_id", "HTTP_HEADER_TIMEOUT_S": "http_header_timeout",
    "HTTP_BODY_TIMEOUT_S": "http_body_timeout", "HTTP_MAX_CONNECTIONS": "http_max_connections",
    "INBOX_BATCH": "inbox_batch", "INBOX_MAX_ATTEMPTS": "inbox_max_attempts",
    "INBOX_RETENTION_S": "inbox_retention_s", "INBOX_PRUNE_INTERVAL_S": "inbox_prune_interval_s",
    "BILLING_WEB_PORT": "billing_web_port", "DB_ROLE_PREFIX": "db_role_prefix", "MODELS": "models",
}


def _parse(var: str, raw: str, kind: object) -> object:
    """`raw`, the value of environment variable `var`, as a field of type `kind`."""
    if kind is bool:
        return raw.strip().lower() not in ("0", "false", "no")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not {'an integer' if kind is int else 'a number'}: "
                             f"set it to one, or unset it for the default") from None
    if kind == tuple[str, ...]:
        return _names(raw)
    return raw


def _relay_mode(env: Mapping[str, str]) -> str:
    """`RELAY_MODE`, or "off" for the older `RELAY_IN_WORKER=0`; refuses an unknown mode."""
    mode = env.get("RELAY_MODE", "").strip().lower()
    if not mode:
        return "off" if env.get("RELAY_IN_WORKER", "1") in ("0", "false", "no") else "process"
    if mode not in RELAY_MODES:
        raise ValueError(f"RELAY_MODE={mode!r} is not one of {', '.join(RELAY_MODES)}: set one of them, or unset it "
                         "for the default (process)")
    return mode


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (`MODELS`, `OWNER_APIS`), blanks dropped."""
    return tuple(name.strip() for name in value.split(",") if name.strip())
