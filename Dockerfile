# The production image: the Faust worker by default; the same image runs the one-shot
# commands (`python -m app init-db`, `outbox status`, `dlq ...`, the demo's `python -m services demo`)
# with another command.
#   docker build -t microservice-events .
#   docker compose up            (Apache Kafka, PostgreSQL, Redis, init-db, worker, demo)

FROM python:3.11-slim AS builder
# On x86_64 every runtime dependency is a wheel; faust-streaming has no aarch64 wheel, so on
# arm64 hosts pip compiles it. The compiler stays in this stage, never in the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml requirements.lock ./
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# Runtime dependencies only: the `embedded` (servers from pip) and `test` extras stay out.
# Their versions are the lock's: the ones the test suite passed with.
RUN python -c "import tomllib; \
        deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
        print(*deps, sep=chr(10))" > requirements.txt \
 && /opt/venv/bin/pip install -c requirements.lock -r requirements.txt
COPY app/ app/
COPY agents/ agents/
COPY models/ models/
COPY services/ services/
RUN /opt/venv/bin/pip install --no-deps .

FROM python:3.11-slim
# The venv holds the dependencies and the package metadata; the code runs from /app, first
# on PYTHONPATH, because app.wire.schemas finds schemas/ next to the app package (SCHEMA_DIR).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    F_DATADIR=/var/lib/microservice-events \
    WEB_PORT=6066
# Faust keeps its state under F_DATADIR: the only directory the app user may write.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
 && install -d -o app -g app /var/lib/microservice-events
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY app/ app/
COPY agents/ agents/
COPY models/ models/
COPY services/ services/
COPY schemas/ schemas/
# Bytecode compiled now, as root: the app user cannot write __pycache__ next to the code.
RUN python -m compileall -q /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 6066
# Liveness from the worker's own web server; slim has no curl, so Python's urllib. The shell
# form expands WEB_PORT at run time. Commands other than the worker turn it off (compose).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${WEB_PORT:-6066}/health/live', timeout=4)"
# Python turns SIGINT into a clean stop even as PID 1 (where SIGTERM's default is ignored),
# so `docker stop` ends the demo at once; the Faust worker shuts down gracefully on either.
STOPSIGNAL SIGINT
# Checks PostgreSQL and the broker (one line, exit 2, when unreachable), then execs
# `faust -A app.main worker -l info`.
CMD ["python", "-m", "app", "worker"]
