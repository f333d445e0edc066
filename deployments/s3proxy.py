"""S3 on the `--listen` address: a plain HTTP relay to the stack's SeaweedFS S3 on loopback.

SeaweedFS's own S3 gateway (`weed s3`) would also open its gRPC port on that address, and that
port takes identity changes (`SeaweedS3IamCache/PutIdentity`) from anyone; this relay exposes the
S3 REST API alone. It passes requests through unchanged (the Host header too, which SigV4
signatures cover), so SeaweedFS still checks every signature: unsigned or wrongly signed
requests get its 403. Standard library only.

    python -m deployments.s3proxy LISTEN_ADDR PORT TARGET_ADDR TARGET_PORT
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import sys
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


class Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    target: tuple[str, int] = ("127.0.0.1", 8333)

    def _relay(self) -> None:
        conn = http.client.HTTPConnection(*self.target, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in HOP:
                    conn.putheader(key, value)
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            if chunked:
                self._copy_chunks(conn)
            else:
                self._copy(int(self.headers.get("Content-Length") or 0), conn)
            resp = conn.getresponse()
            body = None if resp.getheader("Content-Length") else resp.read()
            self.send_response_only(resp.status, resp.reason)
            self.log_request(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in HOP and not (
                    body is not None and key.lower() == "content-length"
                ):
                    self.send_header(key, value)
            if body is not None:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if body is not None:
                self.wfile.write(body)
            else:
                shutil.copyfileobj(resp, self.wfile, BLOCK)
        except OSError as exc:
            self.close_connection = True
            if not self.wfile.closed:
                with contextlib.suppress(OSError):
                    self.send_error(502, f"S3 behind the relay: {exc}")
        finally:
            conn.close()

    def _copy(self, length: int, conn: http.client.HTTPConnection) -> None:
        while length > 0:
            block = self.rfile.read(min(BLOCK, length))
            if not block:
                raise ConnectionError("the client closed the request body early")
            conn.send(block)
            length -= len(block)

    def _copy_chunks(self, conn: http.client.HTTPConnection) -> None:
        """The request's chunks as they come (sizes, data, trailers), to the end."""
        while True:
            line = self.rfile.readline(1 << 12)
            conn.send(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.rfile.readline(1 << 12)
                    conn.send(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            self._copy(size + 2, conn)  # the data and its CRLF

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Method, path and status; never a header or query string (signatures live there)."""
        path = self.path.split("?", 1)[0]
        sys.stderr.write(f"{self.address_string()} {self.command} {path} {code}\n")


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: python -m deployments.s3proxy LISTEN_ADDR PORT TARGET_ADDR TARGET_PORT")
    Relay.target = (argv[2], int(argv[3]))
    server = ThreadingHTTPServer((argv[0], int(argv[1])), Relay)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
