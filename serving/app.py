"""The HTTP side of `agegender serve`: a pure-ASGI gate that checks a request (Host, credentials,
Content-Type, size, room for its body, time before its deadline) before it reads a byte of the
body, then hands the body to the engine (`serving.engine`) in a thread. MLflow's scoring protocol
(POST /invocations, GET /ping, /health, /version) plus what MLflow's server lacks: GET /model (what
is served), GET /metrics (Prometheus), one access-log line per request with its latency.

Every answer but a prediction is `{"error_code": ..., "message": ...}` in our words: never a
traceback, an object's address or a piece of the body.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serving.engine import Engine, Refused
from serving.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("agegender.serve")
access = logging.getLogger("agegender.serve.access")

MEDIA_TYPES = ("application/json", "text/csv")
ROUTES = {
    "/invocations": "POST",
    "/ping": "GET",
    "/health": "GET",
    "/version": "GET",
    "/model": "GET",
    "/metrics": "GET",
}
OPEN = ("/ping", "/health")  # readiness probes answer without credentials: they tell nothing
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


class Metrics:
    """Our own registry (never the process-wide one): what `GET /metrics` shows."""

    def __init__(self, engine: Engine, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        labels = ("path", "status")
        self.requests = Counter(
            "agegender_requests", "HTTP requests answered", labels, registry=self.registry
        )
        self.latency = Histogram(
            "agegender_request_seconds",
            "time from a request's arrival to its answer",
            labels,
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.photos = Counter("agegender_photos", "photos answered", registry=self.registry)
        self.faces = Counter("agegender_faces", "faces predicted", registry=self.registry)
        self.errors = Counter(
            "agegender_errors",
            "refused requests and photos answered with an error row, by kind",
            ("kind",),
            registry=self.registry,
        )
        queue = Gauge(
            "agegender_queue_depth",
            "faces waiting for a forward pass and requests waiting for a decode slot",
            registry=self.registry,
        )
        queue.set_function(lambda: float(engine.queue_depth()))
        body = Gauge(
            "agegender_body_bytes_in_flight",
            "request bodies held in memory",
            registry=self.registry,
        )
        body.set_function(in_flight)


class Budget:
    """Bytes of request bodies held at once (`max_body_bytes_in_flight`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self.lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            return True

    def give(self, n: int) -> None:
        with self.lock:
            self.held -= n


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error_code": HTTPStatus(status).name, "message": message[:200]}).encode()


def basic_credentials(user_pass: str) -> bytes:
    """The Authorization header value a client with `user:password` sends."""
    return ("Basic " + base64.b64encode(user_pass.encode()).decode()).encode()


def build_app(
    engine: Engine,
    settings: ServeSettings,
    info: Mapping[str, Any],
    auth: str | None = None,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app. `info`: what `GET /model` says about the model (`serving.cli`); `auth`:
    "user:password" that every request but the readiness probes must send (HTTP basic)."""
    budget = Budget(settings.max_body_bytes_in_flight)
    metrics = Metrics(engine, lambda: float(budget.held))
    expected_auth = basic_credentials(auth) if auth else None
    hosts = {settings.host.lower(), *LOOPBACK, *(h.lower() for h in settings.allowed_hosts)}
    model = dict(info) | {
        # every setting but where it listens and what it serves: the limits in force
        "limits": settings.model_dump(
            exclude={"model", "run_root", "host", "port", "allowed_hosts", "device"}
        )
    }

    def host_ok(value: str) -> bool:
        name, port = value.lower(), None
        if name.startswith("["):  # [::1]:5001
            bracket, _, rest = name.partition("]")
            name, port = bracket + "]", rest.removeprefix(":") or None
        elif name.count(":") == 1:
            name, _, port = name.partition(":")
        return name in hosts and (port is None or port == str(settings.port))

    async def warm() -> None:
        try:
            await asyncio.to_thread(engine.warm_up)
            log.info("ready: warm-up prediction done")
        except Exception as exc:
            log.error("warm-up failed: %s: %s", type(exc).__name__, exc)
            log.debug("warm-up failed", exc_info=True)

    async def lifespan(receive: Receive, send: Send) -> None:
        tasks: list[asyncio.Task[None]] = []
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                tasks.append(asyncio.create_task(warm()))  # /model and /metrics answer meanwhile
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(engine.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def read_body(
        receive: Receive, length: int | None, held: list[int], arrival: float
    ) -> bytes:
        """The body, counted as it comes (413 when it passes the limit, 503 when it does not
        fit beside the bodies held), within `upload_timeout_s` of the request's arrival."""
        chunks: list[bytes] = []
        size = 0

        async def gather() -> None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Refused(499, "client_gone", "the client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > settings.max_request_bytes:
                    raise too_large(size)
                if length is None:  # chunked: room is taken as it comes
                    if not budget.take(len(chunk)):
                        raise no_room()
                    held[0] += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return

        left = settings.upload_timeout_s - (time.monotonic() - arrival)
        try:
            await asyncio.wait_for(gather(), max(left, 0.0))
        except TimeoutError:
            raise Refused(
                408,
                "upload_timeout",
                f"the request's body was not in within {settings.upload_timeout_s:g} s "
                f"({size} bytes came); send it faster or in smaller requests",
            ) from None
        return b"".join(chunks)

    def too_large(size: int | None) -> Refused:
        got = f"{size} bytes" if size is not None else "more"
        return Refused(
            413,
            "request_too_large",
            f"the request's body is {got}, over the limit of {settings.max_request_bytes} "
            "bytes (max_request_bytes); send fewer or smaller photos per request",
        )

    def no_room() -> Refused:
        return Refused(
            503,
            "busy_bodies",
            "the server holds as many request bodies as it may (max_body_bytes_in_flight); "
            "retry later",
            1.0,
        )

    async def invocations(scope: Scope, receive: Receive, headers: dict[str, str]) -> Any:
        arrival = scope["agegender.arrival"]
        raw_type = headers.get("content-type")
        if not raw_type:
            raise Refused(
                415,
                "content_type",
                "no Content-Type: send application/json (MLflow's scoring formats) or text/csv",
            )
        media = raw_type.split(";")[0].strip().lower()
        if media not in MEDIA_TYPES:
            raise Refused(
                415,
                "content_type",
                f"Content-Type {media[:60]!r} is not accepted: send application/json "
                "(MLflow's scoring formats) or text/csv",
            )
        length: int | None = None
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise Refused(400, "bad_length", "Content-Length is not a number") from None
            if length > settings.max_request_bytes:
                raise too_large(length)
        engine.admit(arrival + settings.deadline_s)  # before the body is read
        held = [0]
        if length is not None:
            if not budget.take(length):
                raise no_room()
            held[0] = length
        try:
            body = await read_body(receive, length, held, arrival)
            deadline = arrival + settings.deadline_s
            answer = await asyncio.to_thread(engine.answer, body, media, deadline)
        finally:
            budget.give(held[0])
        metrics.photos.inc(answer.photos)
        metrics.faces.inc(answer.faces)
        for kind, n in answer.errors.items():
            metrics.errors.labels(kind).inc(n)
        return answer.rows

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        arrival = time.monotonic()
        scope["agegender.arrival"] = arrival
        path, method = scope["path"], scope["method"]
        label = path if path in ROUTES else "other"
        sent = {"status": 0, "bytes": 0}

        async def respond(
            status: int,
            body: bytes,
            media: str = "application/json",
            extra: tuple[tuple[bytes, bytes], ...] = (),
        ) -> None:
            head = [
                (b"content-type", media.encode()),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ]
            if status >= 400 and method == "POST":  # an unread body: the connection ends
                head.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": body})
            sent["status"], sent["bytes"] = status, len(body)

        async def refuse(exc: Refused) -> None:
            metrics.errors.labels(exc.kind).inc()
            extra: tuple[tuple[bytes, bytes], ...] = ()
            if exc.retry_after is not None:
                extra = ((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()),)
            if exc.status == 499:  # nobody to answer
                sent["status"] = 499
                return
            await respond(exc.status, error_body(exc.status, exc.message), extra=extra)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if not host_ok(headers.get("host", "")):
                raise Refused(400, "unknown_host", "unknown Host")
            if expected_auth and path not in OPEN:
                given = headers.get("authorization", "").encode("latin-1")
                if not hmac.compare_digest(given, expected_auth):
                    metrics.errors.labels("unauthorized").inc()
                    await respond(
                        401,
                        error_body(401, "credentials required (HTTP basic)"),
                        extra=((b"www-authenticate", b'Basic realm="agegender"'),),
                    )
                    return
            if path not in ROUTES:
                raise Refused(404, "not_found", f"no such endpoint; try {', '.join(ROUTES)}")
            if method != ROUTES[path] and not (method == "HEAD" and ROUTES[path] == "GET"):
                raise Refused(405, "method", f"{path} takes {ROUTES[path]}")
            if path == "/invocations":
                rows = await invocations(scope, receive, headers)
                body = json.dumps({"predictions": rows}).encode()
                await respond(200, body)
            elif path in ("/ping", "/health"):
                if engine.ready:
                    await respond(200, b"\n", "text/plain")
                else:
                    await respond(503, b"warming up\n", "text/plain")
            elif path == "/version":
                import mlflow

                await respond(200, mlflow.__version__.encode(), "text/plain")
            elif path == "/model":
                await respond(200, json.dumps(model | {"ready": engine.ready}).encode())
            else:
                await respond(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
        except Refused as exc:
            await refuse(exc)
        except Exception as exc:
            log.error("internal error on %s %s: %s", method, path, type(exc).__name__)
            log.debug("internal error", exc_info=True)
            metrics.errors.labels("internal").inc()
            if not sent["status"]:
                await respond(500, error_body(500, "internal error"))
        finally:
            seconds = time.monotonic() - arrival
            status = str(sent["status"])
            metrics.requests.labels(label, status).inc()
            metrics.latency.labels(label, status).observe(seconds)
            client = scope.get("client") or ("-", 0)
            access.info(
                '%s "%s %s" %s %d bytes %.1f ms',
                client[0],
                method,
                path[:100],
                status,
                sent["bytes"],
                seconds * 1000,
            )

    return app
