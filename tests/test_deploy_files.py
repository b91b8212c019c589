"""The deployment files, checked statically: no Docker engine runs here, so docker-compose.yml
and the Dockerfile are parsed and held to what the code and the design expect."""
from __future__ import annotations

import base64
import fnmatch
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.cli.main import build_parser
from app.settings import Settings
from services.__main__ import build_parser as build_services_parser

ROOT = Path(__file__).resolve().parent.parent
DESIGN_VARIABLES = ("DATABASE_URL", "KAFKA_BROKER", "REDIS_URL", "SERVICE_NAME", "WEB_PORT")
APP_SERVICES = ("init", "worker", "demo")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "clang", "make ", "libc6-dev")
ROOT_USERS = ("root", "0", "0:0", "root:root")


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One instruction: its keyword (upper case) and the rest of its logical line."""

    keyword: str
    args: str


@dataclass
class Stage:
    """One build stage: its base image, its `AS` name, and its instructions after FROM."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction of this stage with `keyword`."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        """The last `keyword` instruction of this stage (the one in force), if any."""
        found = self.all(keyword)
        return found[-1] if found else None


def logical_lines(text: str) -> Iterator[str]:
    """The Dockerfile's instructions, continuation lines joined, comment lines dropped."""
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not parts):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        yield " ".join(p for p in parts if p)
        parts = []
    if parts:
        yield " ".join(p for p in parts if p)


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile (instructions before the first FROM, i.e. global ARGs, dropped)."""
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form (JSON array) CMD/ENTRYPOINT; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """Flags, sources and destination of a COPY instruction (shell or JSON form)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def env_of(stage: Stage) -> dict[str, str]:
    """The ENV values a stage sets (`ENV K=V K2=V2` form)."""
    out: dict[str, str] = {}
    for instr in stage.all("ENV"):
        for word in shlex.split(instr.args):
            key, _, value = word.partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    """The Dockerfile's stages."""
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    """The stage the image is made of."""
    return stages[-1]


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nARG X=1\nFROM a:1 AS one\nRUN x \\\n  # inside\n  && y\nFROM --platform=p b:2\nCMD [\"z\"]\n"
    parsed = parse_dockerfile(text)
    assert [(s.base, s.name) for s in parsed] == [("a:1", "one"), ("b:2", None)]
    assert parsed[0].instructions == [Instruction("RUN", "x && y")]
    assert exec_form(parsed[1].instructions[0].args) == ["z"]


def test_dockerfile_is_multi_stage_on_python_311_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert {s.base for s in stages} == {"python:3.11-slim"}


def test_builder_installs_the_project_without_extras(stages: list[Stage]) -> None:
    runs = [r.args for s in stages[:-1] for r in s.all("RUN")]
    installs = [r for r in runs if "pip install" in r]
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", r) for r in installs), installs
    for run in installs:
        assert "[embedded" not in run and "[test" not in run and " -e " not in run, run


def test_builder_requirements_line_lists_the_runtime_dependencies(stages: list[Stage], tmp_path: Path) -> None:
    # Run the builder's own command on pyproject.toml: it must print exactly [project].dependencies.
    import tomllib

    run = next(r.args for r in stages[0].all("RUN") if "tomllib" in r.args)
    command = run.split(" > ")[0]
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    done = subprocess.run(["sh", "-c", command], cwd=tmp_path, env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.splitlines() == expected


def test_final_stage_copies_the_venv_from_the_builder(stages: list[Stage], final: Stage) -> None:
    names = {s.name for s in stages[:-1]}
    froms = [copy_parts(c.args) for c in final.all("COPY") if "--from=" in c.args]
    assert any(flags["from"] in names and srcs == ["/opt/venv"] for flags, srcs, _ in froms), froms
    assert env_of(final)["PATH"].startswith("/opt/venv/bin:")


def test_final_stage_ships_code_and_schemas(final: Stage) -> None:
    # app.wire.schemas finds schemas/ next to the app package, so both must land side by side.
    shipped = {}
    for instr in final.all("COPY"):
        flags, sources, dest = copy_parts(instr.args)
        if "from" not in flags:
            for src in sources:
                shipped[src.rstrip("/")] = dest.rstrip("/")
    assert set(shipped) >= {"app", "agents", "models", "schemas"}
    assert {shipped[d] for d in ("app", "agents", "models", "schemas")} == {"app", "agents", "models", "schemas"}
    assert (final.last("WORKDIR") or Instruction("", "")).args == "/app"
    assert env_of(final)["PYTHONPATH"] == "/app"


def test_copy_sources_exist_and_are_in_the_build_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    for stage in stages:
        for instr in stage.all("COPY"):
            flags, sources, _ = copy_parts(instr.args)
            if "from" in flags:
                continue
            for src in sources:
                path = src.rstrip("/")
                assert (ROOT / path).exists(), f"COPY {src}: no such path in the repository"
                assert not ignored(path, patterns), f"COPY {src}: excluded by .dockerignore"


def test_final_stage_runs_as_a_non_root_user_it_creates(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "the final stage has no USER"
    assert user.args not in ROOT_USERS
    name = user.args.split(":")[0]
    runs = " ".join(r.args for r in final.all("RUN"))
    created = rf"useradd\b[^&;]*--uid {name}\b" if name.isdigit() else rf"useradd\b[^&;]*\b{re.escape(name)}\b"
    assert re.search(created, runs), "the USER is not created in the final stage"
    # USER must come before CMD, or the command would still run as root.
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") < keywords.index("CMD")


def test_final_stage_installs_no_build_tools(final: Stage) -> None:
    for run in final.all("RUN"):
        for tool in BUILD_TOOLS:
            assert tool not in run.args + " ", f"final stage RUN installs {tool.strip()}: {run.args}"


def test_cmd_runs_the_worker_through_the_app_module(final: Stage) -> None:
    cmd = final.last("CMD")
    assert cmd is not None
    argv = exec_form(cmd.args)
    assert argv == ["python", "-m", "app", "worker"]
    assert (ROOT / "app" / "__main__.py").exists()
    assert build_parser().parse_args(argv[3:]).command == "worker"


def test_exposed_port_is_the_default_web_port(final: Stage) -> None:
    exposed = [p for e in final.all("EXPOSE") for p in e.args.split()]
    assert exposed == [str(Settings().web_port)]
    assert env_of(final)["WEB_PORT"] == str(Settings().web_port)


def healthcheck_command(final: Stage) -> str:
    """The shell command of the final stage's HEALTHCHECK."""
    check = final.last("HEALTHCHECK")
    assert check is not None, "no HEALTHCHECK"
    _, _, command = check.args.partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {check.args}"
    return command


def test_healthcheck_calls_health_live_with_urllib(final: Stage) -> None:
    command = healthcheck_command(final)
    assert "/health/live" in command and "${WEB_PORT:-6066}" in command and "urllib" in command
    assert "curl" not in command and "wget" not in command  # neither is in python:3.11-slim


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers /health/live with the status the test sets on the server."""

    def do_GET(self) -> None:  # the name http.server dispatches to
        status = self.server.status if self.path == "/health/live" else 404  # type: ignore[attr-defined]
        self.send_response(status)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads exit codes, not logs."""


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)])
def test_healthcheck_command_passes_only_on_a_live_answer(final: Stage, status: int | None, healthy: bool) -> None:
    # Run the HEALTHCHECK as Docker does (sh -c), against a loopback server on WEB_PORT.
    port = free_port()
    server = None
    if status is not None:
        server = http.server.HTTPServer(("127.0.0.1", port), _Health)
        server.status = status  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "WEB_PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        done = subprocess.run(["sh", "-c", healthcheck_command(final)], env=env, capture_output=True, timeout=30,
                              check=False)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert (done.returncode == 0) is healthy, done.stderr


# --- .dockerignore ---------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    """The .dockerignore patterns, in order (a later `!pattern` re-includes)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (or a folder above it) is excluded; the last matching pattern wins."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(pattern_matches(p, pattern.lstrip("!").strip("/")) for p in prefixes):
            result = not negate
    return result


def pattern_matches(path: str, pattern: str) -> bool:
    """One .dockerignore pattern against one path; a leading `**/` matches at any depth."""
    if pattern.startswith("**/"):
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)


def test_dockerignore_excludes_local_state() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", ".run", "test-artifacts", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                 "app/__pycache__", "microservice-events-data", "microservice_events.egg-info"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "app/cli/main.py", "schemas/orders/v2.avsc", "agents", "models"):
        assert not ignored(path, patterns), f"{path} is needed by the build"


# --- docker-compose.yml ----------------------------------------------------------------------


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` / `${VAR}` with no variable set: the defaults; `$$` is `$`."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", value.replace("$$", "\0"))
        return value.replace("\0", "$")
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed (anchors and merge keys resolved) and interpolated."""
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services of docker-compose.yml."""
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the `KEY=VALUE` list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """target -> condition, from either form of `depends_on`."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def command(service: dict[str, Any], final: Stage) -> list[str]:
    """The argv a service runs: its `command`, else the image's CMD."""
    cmd = service.get("command")
    if cmd is None:
        return exec_form((final.last("CMD") or Instruction("CMD", "[]")).args)
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def built_here(service: dict[str, Any]) -> bool:
    """Whether the service's image is built from this repository's Dockerfile."""
    build = service.get("build")
    if isinstance(build, dict):
        return build.get("context", ".") in (".", "./") and build.get("dockerfile", "Dockerfile") == "Dockerfile"
    return build in (".", "./")


def has_healthcheck(service: dict[str, Any], final: Stage) -> bool:
    """A health check of its own, or the Dockerfile's HEALTHCHECK when built here; not disabled."""
    check = service.get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and bool(check.get("test"))
    return built_here(service) and final.last("HEALTHCHECK") is not None


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {"kafka", "postgres", "redis", *APP_SERVICES}
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
    for name in APP_SERVICES:
        assert built_here(services[name]), f"{name} is not built from the Dockerfile"


def test_app_services_have_the_design_variables(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        env = environment(services[name])
        missing = [v for v in DESIGN_VARIABLES if not env.get(v)]
        assert not missing, f"{name} lacks {missing}"


def test_app_urls_point_at_the_compose_servers(services: dict[str, dict[str, Any]]) -> None:
    pg = environment(services["postgres"])
    kafka = environment(services["kafka"])
    advertised = {urlsplit(u).netloc for u in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name in APP_SERVICES:
        settings = Settings.from_env(environment(services[name]))
        db = urlsplit(settings.database_url)
        assert db.scheme == "postgresql+asyncpg"
        assert (db.hostname, db.port) == ("postgres", 5432) and db.hostname in services
        assert (db.username, db.password, db.path.lstrip("/")) == (
            pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
        assert settings.kafka_broker.startswith("kafka://")
        assert settings.bootstrap_servers in advertised, (settings.bootstrap_servers, advertised)
        assert settings.bootstrap_servers.split(":")[0] in services
        redis = urlsplit(settings.redis_url)
        assert redis.scheme == "redis" and redis.hostname in services
        assert settings.service_name == "orders"


def test_the_worker_binds_every_container_interface_and_advertises_its_service_name(
        services: dict[str, dict[str, Any]]) -> None:
    # WEB_HOST is the bind (loopback unless asked); a published port needs the container's
    # every interface, and other workers dial the advertised name for routed table lookups.
    settings = Settings.from_env(environment(services["worker"]))
    assert settings.web_host == "0.0.0.0" and settings.advertised_host == "worker" and "worker" in services
    assert services["worker"]["ports"] == [f"{settings.web_port}:{settings.web_port}"]


def test_depends_on_targets_exist_and_are_ready_when_required(services: dict[str, dict[str, Any]],
                                                              final: Stage) -> None:
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                assert has_healthcheck(services[target], final), f"{name} waits for {target}'s health, it has none"
            elif condition == "service_completed_successfully":
                # A one-shot: restarting it would never let the dependants start.
                assert services[target].get("restart", "no") == "no", target
            else:
                assert condition == "service_started", condition


def test_the_worker_waits_for_its_servers_and_init(services: dict[str, dict[str, Any]]) -> None:
    assert depends_on(services["worker"]) == {
        "init": "service_completed_successfully", "postgres": "service_healthy",
        "kafka": "service_healthy", "redis": "service_healthy"}
    assert depends_on(services["demo"])["init"] == "service_completed_successfully"
    assert depends_on(services["init"]) == {"postgres": "service_healthy"}


def test_commands_are_valid_app_commands(services: dict[str, dict[str, Any]], final: Stage) -> None:
    expected = {"init": ["app", "init-db"], "worker": ["app", "worker"],
                "demo": ["services", "demo", "--rate", "20"], "billing": ["services", "billing"]}
    for name, args in expected.items():
        argv = command(services[name], final)
        assert argv == ["python", "-m", *args], argv
        # Exits (SystemExit) on a command the CLI does not know.
        (build_parser() if args[0] == "app" else build_services_parser()).parse_args(argv[3:])


def test_only_the_worker_keeps_the_image_healthcheck(services: dict[str, dict[str, Any]], final: Stage) -> None:
    # The HEALTHCHECK asks the worker's web server; the other commands have none to ask.
    assert has_healthcheck(services["worker"], final)
    assert not has_healthcheck(services["init"], final)
    assert not has_healthcheck(services["demo"], final)


def published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(published, target) port pairs, from the short or the long syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((str(port.get("published", "")), str(port["target"])))
        else:
            *host, target = str(port).split(":")
            out.append((host[-1] if host else "", target.split("/")[0]))
    return out


def test_worker_publishes_its_web_port(services: dict[str, dict[str, Any]], final: Stage) -> None:
    worker = services["worker"]
    web_port = environment(worker)["WEB_PORT"]
    assert (web_port, web_port) in published(worker)
    assert web_port in [p for e in final.all("EXPOSE") for p in e.args.split()]


def test_server_images_and_health_checks(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["image"] == "redis:7"
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    image, _, tag = services["kafka"]["image"].partition(":")
    assert image == "apache/kafka"
    assert tuple(int(x) for x in tag.split(".")[:2]) >= (3, 9)
    assert services["kafka"]["healthcheck"]["test"]


def test_kafka_is_one_kraft_broker_and_controller(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1 and voters[0].startswith(f"{node}@")
    listeners = {u.split("://")[0]: u for u in env["KAFKA_LISTENERS"].split(",")}
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller in protocols
    assert voters[0].rsplit(":", 1)[1] == listeners[controller].rsplit(":", 1)[1]
    advertised = {u.split("://")[0]: u.split("://")[1] for u in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert controller not in advertised
    for name in advertised:
        assert name in listeners and name in protocols
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key
    # The relay creates topics with Settings.topic_partitions; auto-created ones must match.
    assert int(env["KAFKA_NUM_PARTITIONS"]) == Settings().topic_partitions
    # kafka-storage format accepts only a base64url-encoded UUID.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
