"""The front door of each server on the `--listen` address: a plain HTTP relay to the server on
loopback that refuses what the server would read whole before asking who calls.

MLflow (its WSGI app) and Prefect read a request's whole body into memory before their
authentication answers; an unauthenticated 1 GB POST cost MLflow 1.4 GB. So before it reads a
body this relay refuses (the connection then closes, the body unread):

- a body over the service's limit: 413 (a Content-Length over it at once; a chunked body when
  its count passes it);
- for MLflow and Prefect, a body without credentials: 401; with credentials, it first asks the
  server itself with the same Authorization header (one cheap authenticated GET, a success
  remembered `AUTH_CACHE_S`), so only bodies of callers the server knows ever reach it;
- an address whose credentials failed `MAX_FAILURES` times within `WINDOW_S`: 429 with
  Retry-After for its requests with credentials (password guessing), until the window passes.

Requests without a body (the UIs, health checks) and websockets (Prefect's `/api/events/in`,
`/api/logs/out`: tunneled both ways) pass unchanged, to the server's own authentication. S3
(SeaweedFS) checks its own SigV4 signatures, so S3 gets the size limit alone, and its gRPC ports
stay on loopback. The Host header passes unchanged (SigV4 signs it; MLflow checks it). The log has
one line per request: address, method, path without query, status; never a header. Standard
library only.

    python -m deployments.relay SERVICE LISTEN_ADDR PORT TARGET_ADDR TARGET_PORT MAX_BODY

MAX_BODY is bytes, or whole MiB as `512MiB`. The compose stack runs this file as a script in its
front doors (docker/compose.yaml: `mlflow-door`, `prefect-door`, `s3-door`; MiB from docker/.env).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# hop-by-hop headers (RFC 9110 7.6.1) and Expect (the relay answers 100-continue itself)
HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
BLOCK = 1 << 16
# a cheap GET that needs credentials, per service that asks for them (S3: none, SigV4 instead)
AUTH_CHECK = {
    "mlflow": "/api/2.0/mlflow/experiments/search?max_results=1",
    "prefect": "/api/admin/version",
}
SERVICES = ("s3", "mlflow", "prefect")
AUTH_CACHE_S = 30.0  # how long a server's "yes" to an Authorization header is trusted
MAX_FAILURES = 10  # failed logins per client address within WINDOW_S before 429
WINDOW_S = 60.0
DRAIN = 1 << 20  # unread body discarded after a refusal, so the client reads the answer


def end_to_end(headers: Iterable[tuple[str, str]], put: Callable[[str, str], object]) -> None:
    """The headers that pass a relay (RFC 9110 7.6.1: hop-by-hop ones stop here)."""
    for key, value in headers:
        if key.lower() not in HOP:
            put(key, value)


class Door:
    """What the relay knows across requests: whose credentials the server took, who failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.good: dict[str, float] = {}  # sha256 of an Authorization header -> valid until
        self.failures: dict[str, deque[float]] = {}

    def known(self, authorization: str) -> bool:
        key = hashlib.sha256(authorization.encode()).hexdigest()
        with self.lock:
            return self.good.get(key, 0.0) > time.monotonic()

    def remember(self, authorization: str) -> None:
        key = hashlib.sha256(authorization.encode()).hexdigest()
        with self.lock:
            self.good[key] = time.monotonic() + AUTH_CACHE_S

    def failed(self, address: str) -> None:
        with self.lock:
            self.failures.setdefault(address, deque()).append(time.monotonic())

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try credentials again (0: now)."""
        now = time.monotonic()
        with self.lock:
            times = self.failures.get(address)
            while times and times[0] <= now - WINDOW_S:
                times.popleft()
            if not times or len(times) < MAX_FAILURES:
                return 0
            return max(1, int(times[-MAX_FAILURES] + WINDOW_S - now + 1))


class Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # unbuffered: nothing of a websocket's first bytes hides in a buffer
    # a malformed request line gets a whole HTTP/1.1 400 (HTTP/0.9's would be a bare page)
    default_request_version = "HTTP/1.1"
    service = "s3"
    target: tuple[str, int] = ("127.0.0.1", 8333)
    max_body = 5 << 30
    door = Door()

    def handle_expect_100(self) -> bool:
        """Not yet: `_relay` answers 100-continue once the body may come."""
        return True

    def _refuse(self, code: int, why: str, headers: dict[str, str] | None = None) -> None:
        """Answer `code` and close, the body unread (a little drained, so the answer arrives)."""
        self.close_connection = True
        body = f"{why}\n".encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2)
            left = DRAIN
            while left > 0 and (got := self.connection.recv(min(BLOCK, left))):
                left -= len(got)

    def _authorized(self, authorization: str) -> bool | None:
        """Whether the server takes this Authorization header (None: it could not say)."""
        if self.door.known(authorization):
            return True
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        try:
            host = self.headers.get("Host", f"{self.target[0]}:{self.target[1]}")
            headers = {"Authorization": authorization, "Host": host}
            conn.request("GET", AUTH_CHECK[self.service], headers=headers)
            resp = conn.getresponse()
            resp.read()
        except OSError:
            return None
        finally:
            conn.close()
        if resp.status == 401:
            return False
        if resp.status >= 500:
            return None
        self.door.remember(authorization)  # 200, or 403: known, only not allowed everywhere
        return True

    def _admit(self) -> tuple[int, bool] | None:
        """The body's length and whether chunked, once this request may be read; else the
        refusal is sent and None returned."""
        address = self.client_address[0]
        authorization = self.headers.get("Authorization", "")
        checks = self.service in AUTH_CHECK
        if checks and authorization and (wait := self.door.retry_after(address)):
            self._refuse(429, "too many failed logins from here", {"Retry-After": str(wait)})
            return None
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            length = 0 if chunked else int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "bad Content-Length")
            return None
        if length > self.max_body:
            self._refuse(413, f"request body over {self.max_body} bytes")
            return None
        if checks and (chunked or length):
            if not authorization:
                self._refuse(
                    401, "credentials required", {"WWW-Authenticate": 'Basic realm="agegender"'}
                )
                return None
            ok = self._authorized(authorization)
            if ok is None:
                self._refuse(502, f"{self.service} behind the relay did not answer")
                return None
            if not ok:
                self.door.failed(address)
                self._refuse(
                    401, "wrong credentials", {"WWW-Authenticate": 'Basic realm="agegender"'}
                )
                return None
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        return length, chunked

    def _relay(self) -> None:
        if "upgrade" in self.headers.get("Connection", "").lower() and self.headers.get("Upgrade"):
            self._tunnel()
            return
        admitted = self._admit()
        if admitted is None:
            return
        length, chunked = admitted
        conn = http.client.HTTPConnection(*self.target, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            end_to_end(self.headers.items(), conn.putheader)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            if chunked:
                if not self._copy_chunks(conn):
                    self._refuse(413, f"request body over {self.max_body} bytes")
                    return
            else:
                self._copy(length, conn)
            resp = conn.getresponse()
            if (
                resp.status == 401
                and self.headers.get("Authorization")
                and self.service in AUTH_CHECK
            ):
                self.door.failed(self.client_address[0])
            self._answer(resp)
        except OSError as exc:
            self.close_connection = True
            if not self.wfile.closed:
                with contextlib.suppress(OSError):
                    self.send_error(502, f"{self.service} behind the relay: {exc}")
        finally:
            conn.close()

    def _answer(self, resp: http.client.HTTPResponse) -> None:
        """The server's answer, its body streamed (re-chunked where it had no length)."""
        bodiless = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        length = resp.getheader("Content-Length")
        rechunk = not bodiless and length is None
        self.send_response_only(resp.status, resp.reason)
        self.log_request(resp.status)
        end_to_end(resp.getheaders(), self.send_header)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if bodiless:
            return
        while block := resp.read1(BLOCK) if rechunk else resp.read(BLOCK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if rechunk else block)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")

    def _tunnel(self) -> None:
        """A websocket: the request as it came, then bytes both ways until one side closes."""
        self.close_connection = True
        try:
            upstream = socket.create_connection(self.target, timeout=60)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.send_error(502, f"{self.service} behind the relay: {exc}")
            return
        self.log_request("tunnel")
        head = [self.requestline.encode("latin-1")]
        head += [f"{k}: {v}".encode("latin-1") for k, v in self.headers.items()]
        with upstream:
            upstream.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            upstream.settimeout(None)
            self.connection.settimeout(None)
            ends = [self.connection, upstream]
            while True:
                ready, _, _ = select.select(ends, [], [], 3600)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(BLOCK)
                    if not data:
                        return
                    (upstream if end is self.connection else self.connection).sendall(data)

    def _copy(self, length: int, conn: http.client.HTTPConnection) -> None:
        while length > 0:
            block = self.rfile.read(min(BLOCK, length))
            if not block:
                raise ConnectionError("the client closed the request body early")
            conn.send(block)
            length -= len(block)

    def _copy_chunks(self, conn: http.client.HTTPConnection) -> bool:
        """The request's chunks as they come (sizes, data, trailers), to the end; False once
        their sizes pass the limit (nothing more read)."""
        total = 0
        while True:
            line = self.rfile.readline(1 << 12)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            total += size
            if total > self.max_body:
                return False
            conn.send(line)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.rfile.readline(1 << 12)
                    conn.send(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return True
            self._copy(size + 2, conn)  # the data and its CRLF

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _relay

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Method, path and status; never a header or query string (signatures live there).
        A request too malformed to have a path is logged as such."""
        path = getattr(self, "path", "").split("?", 1)[0]
        what = f"{self.command} {path}" if self.command and path else "(malformed request)"
        sys.stderr.write(f"{self.address_string()} {what} {code}\n")

    def log_error(self, format: str, *args: object) -> None:
        """`send_error` logs its request through `log_request`; its message may quote the
        raw request line (a signature), so it is not logged."""


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client gone mid-request is one line, not a traceback."""
        exc = sys.exc_info()[1]
        sys.stderr.write(f"{client_address[0]} dropped: {type(exc).__name__}: {exc}\n")


def body_limit(text: str) -> int | None:
    """MAX_BODY in bytes: `N` bytes or `NMiB` (compose's AGEGENDER_*_MAX_BODY_MB), N >= 1;
    None for anything else."""
    digits = text.removesuffix("MiB")
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        return None
    return int(digits) << 20 if digits != text else int(digits)


def main(argv: list[str]) -> None:
    if len(argv) != 6 or argv[0] not in SERVICES:
        sys.exit(
            "usage: python -m deployments.relay {s3,mlflow,prefect} LISTEN_ADDR PORT "
            "TARGET_ADDR TARGET_PORT MAX_BODY (bytes, or MiB as 512MiB)"
        )
    limit = body_limit(argv[5])
    if limit is None:
        sys.exit(
            f"error: the {argv[0]} front door's body limit {argv[5]!r} is not a whole number of "
            f"bytes or of MiB (512MiB), at least 1: fix AGEGENDER_{argv[0].upper()}_MAX_BODY_MB "
            "in docker/.env, then `docker compose ... up -d` again; nothing was started"
        )
    Relay.service = argv[0]
    Relay.target = (argv[3], int(argv[4]))
    Relay.max_body = limit
    Server((argv[1], int(argv[2])), Relay).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
