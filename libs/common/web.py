"""aiohttp building blocks every service uses: typed app state, one cleanup_ctx per
resource, request-scoped log context, health, readiness, and metrics on a listener of their
own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from os import urandom
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from multidict import MultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from libs.common.db import create_pool, migrate
from libs.common.events import COMPACTED_TOPICS, Topic
from libs.common.housekeeping import Expiry, Housekeeper, inbox_expiry
from libs.common.kafka import (
    BatchHandler,
    ConsumerRunner,
    EventHandler,
    create_producer,
)
from libs.common.kafka_topics import ensure_topics, topics_with_dead_letters
from libs.common.metrics import HTTP_LATENCY, HTTP_REQUESTS
from libs.common.outbox import OutboxRelay
from libs.common.settings import ServiceSettings

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", ServiceSettings)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
KAFKA_PRODUCER = web.AppKey("kafka_producer", AIOKafkaProducer)
OUTBOX_RELAY = web.AppKey("outbox_relay", OutboxRelay)
CONSUMERS = web.AppKey("consumers", list[ConsumerRunner])
# What the service's housekeeper deletes; each service adds its own tables' in create_app.
EXPIRIES = web.AppKey("expiries", list[Expiry])
HOUSEKEEPER = web.AppKey("housekeeper", Housekeeper)
MAX_BODY = web.AppKey("max_body_bytes", int)
# Where the metrics listener is bound once the app started (the real port when configured as 0).
METRICS_PORT = web.AppKey("metrics_port", int)

MAX_BODY_BYTES = 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BodyRefusalRenderer = Callable[[web.Request, int, str], web.StreamResponse]
# A service may render body_limit's refusals (413, 400) for its audience (JSON for an API, a
# page with its security headers for a browser): body_limit runs outside its middlewares.
BODY_REFUSAL: web.AppKey[BodyRefusalRenderer] = web.AppKey("body_refusal")


# Labelled children by (route template, method, status): a label lookup costs more than the
# count itself (15 of 21 us per request). Bounded by the routes, methods and statuses served.
_REQUEST_METRICS: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _request_metrics(route: str, method: str, status: int) -> tuple[Counter, Histogram]:
    # Any token is a method to HTTP: an invented one must not mint a label value.
    key = (route, method if method in _METHODS else "other", status)
    children = _REQUEST_METRICS.get(key)
    if children is None:
        children = (HTTP_REQUESTS.labels(route, key[1], str(status)), HTTP_LATENCY.labels(route))
        _REQUEST_METRICS[key] = children
    return children


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Binds a request id to every log line of the request and records its metrics."""
    incoming = request.headers.get("X-Request-Id", "")
    # 128 random bits as hex, as uuid4().hex gives but without building a UUID object.
    request_id = incoming if 8 <= len(incoming) <= 64 and incoming.isascii() else urandom(16).hex()
    route = request.match_info.route.resource
    # The route template, never the path: paths carry tokens and ids.
    route_name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    # Tokens rather than the bound_contextvars context manager, which reads and restores the
    # whole context around every request (with urandom for the id: a bare aiohttp request
    # behind this middleware went from 290 to 263 us of CPU, docs/performance.md).
    bound = structlog.contextvars.bind_contextvars(request_id=request_id, route=route_name)
    try:
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = request_id
            raise
        except Exception:
            log.exception("unhandled error", method=request.method)
            raise web.HTTPInternalServerError(
                text=f"Internal error. Reference: {request_id}",
                headers={"X-Request-Id": request_id},
            ) from None
        finally:
            elapsed = time.perf_counter() - started
            counted, timed = _request_metrics(route_name, request.method, status)
            counted.inc()
            timed.observe(elapsed)
            if status >= 500:
                log.error("request failed", method=request.method, status=status)
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        structlog.contextvars.reset_contextvars(**bound)


def _refused(request: web.Request, status: int, message: str) -> web.StreamResponse:
    render = request.app.get(BODY_REFUSAL)
    response = (
        render(request, status, message) if render else web.Response(status=status, text=message)
    )
    # The rest of the body is drained and dropped (or cannot be read), and the connection is
    # not reused.
    response.force_close()
    return response


@web.middleware
async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuses a body over the app's client_max_size with 413 before any handler runs: by
    its Content-Length, or, for a chunked body, by reading it up to the limit first (the
    handler then reads it from memory), so even a handler that ignores its body never acts
    on an oversized request. A compressed body can still pass the limit once inflated, when
    the handler reads it: that is refused with 413 too, and one that does not inflate (bad
    gzip or deflate) with 400."""
    length = request.content_length
    try:
        if length is not None and length > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(request.client_max_size, length)
        if length is None and request.body_exists:
            await request.read()
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        log.info("request body refused", method=request.method, content_length=length)
        limit = request.client_max_size
        return _refused(
            request, 413, f"The request body is larger than {limit} bytes; nothing was read."
        )
    except web.RequestPayloadError:
        # A Content-Encoding (gzip, deflate) whose bytes do not decode.
        log.info("request body refused: undecodable", method=request.method)
        # Nothing more can be read from it: without this, aiohttp's lingering close would
        # read on after the answer and log the same error as an unhandled exception.
        request.content.feed_eof()
        return _refused(request, 400, "The request body could not be decoded.")


def whole_number(text: str, max_digits: int) -> int | None:
    """A whole number typed by someone: ASCII digits only ("²".isdigit() is true too, and
    int() refuses it), at most `max_digits` of them; None otherwise."""
    if text.isascii() and text.isdigit() and len(text) <= max_digits:
        return int(text)
    return None


async def read_form(
    request: web.Request,
) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """request.post(), except that a body that is not a form is refused with 400: aiohttp
    raises ValueError for a multipart body without its boundary or with a nameless part,
    UnicodeDecodeError for bytes that are not UTF-8, LookupError for an unknown charset."""
    try:
        return await request.post()
    except (ValueError, LookupError):
        raise web.HTTPBadRequest(text="The form could not be read.") from None


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _kafka_ready(producer: AIOKafkaProducer) -> bool:
    client = producer.client
    node_id = client.get_random_node()
    if node_id is None:
        await client.force_metadata_update()
        node_id = client.get_random_node()
    return node_id is not None and bool(await client.ready(node_id))


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await request.app[DB_POOL].fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"unavailable: {type(exc).__name__}"
    try:
        async with asyncio.timeout(2):
            checks["kafka"] = (
                "ok" if await _kafka_ready(request.app[KAFKA_PRODUCER]) else "unavailable"
            )
    except Exception as exc:
        checks["kafka"] = f"unavailable: {type(exc).__name__}"
    for runner in request.app.get(CONSUMERS, []):
        checks[f"consumer:{runner.name}"] = "ok" if runner.running else "stopped"
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


def metrics_app() -> web.Application:
    """/metrics and nothing else. Its series count every tenant's traffic (routes, consumers,
    analytics' departments) without sign-in, so they are for the cluster's Prometheus only,
    never for whoever reaches the service's public port."""
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def metrics_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serves metrics_app on settings.metrics_port, beside the service's own port. First in
    cleanup_ctx, so it answers while migrations run and while the service drains."""
    settings = app[SETTINGS]
    runner = web.AppRunner(metrics_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.metrics_listen_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    app[METRICS_PORT] = port
    log.info("metrics listener started", host=settings.http_host, port=port)
    yield
    await runner.cleanup()


def database_ctx(
    migrations_dir: Path, shared_migrations: Sequence[tuple[str, Path]] = ()
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        pool = await create_pool(
            settings.database_url.get_secret_value(),
            settings.database_schema,
            settings.database_pool_min,
            settings.database_pool_max,
            settings.database_custom_plans,
        )
        await migrate(
            pool,
            settings.database_schema,
            migrations_dir,
            shared_migrations,
            settings.migration_parameters(),
        )
        app[DB_POOL] = pool
        yield
        await pool.close()

    return ctx


async def kafka_producer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.kafka_create_topics:
        # Every service creates the whole catalogue: idempotent, and no start-order coupling.
        await ensure_topics(
            settings.kafka_bootstrap_servers,
            topics_with_dead_letters(settings.topic(t) for t in Topic),
            settings.kafka_topic_partitions,
            compacted=[settings.topic(t) for t in COMPACTED_TOPICS],
            security=settings.kafka_security(),
        )
    producer = create_producer(settings.kafka_bootstrap_servers, settings.kafka_security())
    await producer.start()
    app[KAFKA_PRODUCER] = producer
    yield
    await producer.stop()


async def outbox_relay_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    relay = OutboxRelay(
        app[DB_POOL],
        app[KAFKA_PRODUCER],
        schema=settings.database_schema,
        topic_prefix=settings.kafka_topic_prefix,
        poll_interval_s=settings.outbox_poll_interval_s,
        retention_minutes=settings.outbox_retention_minutes,
    )
    app[OUTBOX_RELAY] = relay
    task = asyncio.create_task(relay.run(), name="outbox-relay")
    yield
    await relay.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=settings.shutdown_drain_timeout_s)


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    housekeeper = Housekeeper(
        app[DB_POOL],
        [inbox_expiry(timedelta(days=settings.dedupe_retention_days)), *app[EXPIRIES]],
        interval_s=settings.housekeeping_interval_s,
    )
    app[HOUSEKEEPER] = housekeeper
    task = asyncio.create_task(housekeeper.run(), name="housekeeping")
    yield
    housekeeper.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=settings.shutdown_drain_timeout_s)


def consumer_ctx(
    group: str,
    handlers: dict[str, EventHandler],
    *,
    parallel_partitions: int = 1,
    batch_handler: BatchHandler | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        runner = ConsumerRunner(
            name=settings.kafka_topic_prefix + group,
            handlers=handlers,
            pool=app[DB_POOL],
            producer=app[KAFKA_PRODUCER],
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topic_prefix=settings.kafka_topic_prefix,
            batch_size=settings.consumer_batch_size,
            fetch_min_bytes=settings.consumer_fetch_min_bytes,
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
            max_poll_interval_ms=settings.consumer_max_poll_interval_ms,
            handler_timeout_s=settings.external_call_timeout_s * 3,
            security=settings.kafka_security(),
            parallel_partitions=parallel_partitions,
            batch_handler=batch_handler,
        )
        await runner.start()
        app.setdefault(CONSUMERS, []).append(runner)
        yield
        await asyncio.wait_for(runner.stop(), timeout=settings.shutdown_drain_timeout_s)

    return ctx


def create_service_app(
    settings: ServiceSettings,
    *,
    migrations_dir: Path,
    shared_migrations: Sequence[tuple[str, Path]] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> web.Application:
    """The base every service builds on: state, the metrics listener, pool, producer, relay
    and the health routes. Request bodies over `max_body_bytes` are refused with 413 (see
    body_limit)."""
    app = web.Application(middlewares=[request_context, body_limit], client_max_size=max_body_bytes)
    app[SETTINGS] = settings
    app[CONSUMERS] = []
    app[EXPIRIES] = []
    app[MAX_BODY] = max_body_bytes
    app.cleanup_ctx.append(metrics_listener_ctx)
    app.cleanup_ctx.append(database_ctx(migrations_dir, shared_migrations))
    app.cleanup_ctx.append(kafka_producer_ctx)
    app.cleanup_ctx.append(outbox_relay_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
