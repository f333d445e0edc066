"""The hostile battery against a running model server (issue 29, items 3 and 4): what
`tests/test_serve_battery.py` asserts and `benchmarks/serve_battery.py` runs at full length.

Each case is sent over raw sockets (so that a head can announce a body that never comes, or come
without a Content-Type) and is followed by a good request that must answer 200 with the rows of
the warm answer. The server's memory is its resident set at every moment: its peak is the
kernel's high-water mark (VmHWM, reset before each case through /proc/PID/clear_refs) and, where
that cannot be reset, the largest VmRSS a thread samples every 20 ms.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


# --- the server's memory --------------------------------------------------------------------


class Memory:
    """The resident set of process `pid`: now, and its peak since the last `reset`."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid = pid
        self.every_s = every_s
        self._sampled = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hwm = self._can_reset()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def status(pid: int, key: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _status(self, key: str) -> int:
        return self.status(self.pid, key)

    def _can_reset(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                rss = self._status("VmRSS")
            except (OSError, KeyError):
                return
            with self._lock:
                self._sampled = max(self._sampled, rss)

    def rss(self) -> int:
        return self._status("VmRSS")

    def reset(self) -> None:
        with self._lock:
            self._sampled = self.rss()
        if self._hwm:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak(self) -> int:
        with self._lock:
            sampled = self._sampled
        return max(sampled, self._status("VmHWM")) if self._hwm else sampled

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def biggest(pid: int) -> int:
    """The process of `pid`'s tree with the largest resident set: the one that answers
    (`mlflow models serve` runs uvicorn as a child; `agegender serve` answers itself)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    rss = {}
    for p in tree:
        with contextlib.suppress(OSError, KeyError):
            rss[p] = Memory.status(p, "VmRSS")
    return max(rss, key=rss.__getitem__)


# --- HTTP over a raw socket -----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the server took before it answered

    def json(self) -> Any:
        return json.loads(self.body)


def _read_reply(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {bytes(data[:200])!r}")
        data += chunk
    end = data.index(b"\r\n\r\n")
    lines = data[:end].decode("latin-1").split("\r\n")
    rest = bytearray(data[end + 4 :])
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    need = int(headers.get("content-length", -1))
    while need < 0 or len(rest) < need:  # chunked, or until close
        try:
            chunk = sock.recv(1 << 20)
        except OSError:
            break
        if not chunk:
            break
        rest += chunk
        if headers.get("transfer-encoding") == "chunked" and rest.endswith(b"0\r\n\r\n"):
            break
    if need >= 0:
        return status, headers, bytes(rest[:need])
    if headers.get("transfer-encoding") == "chunked":
        body, pos = bytearray(), 0
        while True:
            end = rest.index(b"\r\n", pos)
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0:
                break
            body += rest[end + 2 : end + 2 + size]
            pos = end + 4 + size
        rest = body
    return status, headers, bytes(rest)


def send(
    port: int,
    body: bytes | Iterable[bytes] = b"",
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    path: str = "/invocations",
    content_length: int | None = None,
    chunked: bool = False,
    timeout: float = 600,
) -> Reply:
    """One request on its own connection. The body goes out piece by piece; once the server
    answers (or closes) the rest is not sent, as a client that reads while it writes."""
    pieces = [body] if isinstance(body, bytes) else body
    head = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if chunked:
        head["Transfer-Encoding"] = "chunked"
    elif content_length is not None:
        head["Content-Length"] = str(content_length)
    elif isinstance(body, bytes):
        head["Content-Length"] = str(len(body))
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(text.encode("latin-1") + b"\r\n")
        answered = False
        try:
            for piece in pieces:
                data = memoryview(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                while data and not answered:
                    readable, writable, _ = select.select([sock], [sock], [], timeout)
                    answered = bool(readable)  # an answer (or a close) before the whole body
                    if writable and not answered:
                        n = sock.send(data[: 1 << 16])
                        data = data[n:]
                        sent += n
                if answered:
                    break
            else:
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers_, reply = _read_reply(sock, timeout)
    return Reply(status, headers_, reply, sent)


JSON = {"Content-Type": "application/json"}


def good_body(photo: bytes) -> bytes:
    return json.dumps({"dataframe_records": [{"image": base64.b64encode(photo).decode()}]}).encode()


# --- hostile bodies -------------------------------------------------------------------------


def repeat(piece: bytes, total: int, size: int = MiB) -> Iterator[bytes]:
    """`total` bytes of `piece` repeated, in `size` blocks, never all in memory."""
    block = (piece * (size // len(piece) + 1))[:size]
    left = total
    while left > 0:
        yield block[:left]
        left -= len(block)


def nested_photo(side: int) -> tuple[int, Iterator[bytes]]:
    """`{"inputs": {"image": [photo]}}` with a side x side x 3 nested-list photo, streamed:
    (its length, its pieces)."""
    pixel = b"[255,255,255]"
    row = b"[" + b",".join([pixel] * side) + b"]"
    head, tail = b'{"inputs": {"image": [[', b"]]}}"
    total = len(head) + side * len(row) + (side - 1) + len(tail)

    def pieces() -> Iterator[bytes]:
        yield head
        rows = b",".join([row] * 16)
        left = side
        while left >= 16:
            yield rows + (b"," if left > 16 else b"")
            left -= 16
        for i in range(left):
            yield row + (b"," if i < left - 1 else b"")
        yield tail

    return total, pieces()


@functools.cache
def png(width: int, height: int, grey: int = 128) -> bytes:
    """A valid RGB PNG of one colour, made in a second without holding its pixels (a bomb at
    400 MP: 1.2 GB decoded from about 1 MB). Blocks of rows are deflated with a full flush, so
    every whole block deflates to the same bytes: one is compressed, the rest repeat it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + bytes([grey]) * (3 * width)
    per_block = max(1, (4 * MiB) // len(row))
    block = row * per_block
    whole, rest = divmod(height, per_block)
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate: header and checksum ours
    unit = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    check = zlib.adler32(b"")
    for _ in range(whole):
        check = zlib.adler32(block, check)
    tail = packer.compress(row * rest) + packer.flush()
    check = zlib.adler32(row * rest, check)
    data = b"\x78\x9c" + unit * whole + tail + struct.pack(">I", check)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def records(images: Iterable[bytes]) -> bytes:
    rows = [{"image": base64.b64encode(image).decode()} for image in images]
    return json.dumps({"dataframe_records": rows}).encode()


def pixel_array(value: Any, side: int = 8) -> bytes:
    photo = [[[value] * 3] * side] * side
    return json.dumps({"inputs": {"image": [photo]}}).encode().replace(b'"NaN"', b"NaN")


def same(a: Any, b: Any, tol: float = 1e-5) -> bool:
    """Equal rows, probabilities to `tol`: a face's batch-mates may change the last bits."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return bool(a == b)


# --- the battery ----------------------------------------------------------------------------


@dataclass
class Result:
    case: str
    status: str  # what the hostile requests got, e.g. "413" or "408 x50"
    seconds: float
    peak_over_warm: int  # bytes
    good: bool  # the good request after it answered 200 with the warm rows
    sent: int = 0  # the most body bytes one hostile request got to send
    answer_bytes: int = 0  # the longest answer body
    notes: list[str] = field(default_factory=list)


@dataclass
class Battery:
    """A server on `port` (process `pid`) and the good photo whose rows it answered warm."""

    port: int
    pid: int
    photo: bytes
    auth: dict[str, str] = field(default_factory=dict)
    expected: Any = None
    warm: int = 0
    memory: Memory | None = None

    def answers_right(self, reply: Reply) -> bool:
        return reply.status == 200 and same(reply.json(), self.expected)

    def good(self) -> Reply:
        return send(self.port, good_body(self.photo), JSON | self.auth)

    def start(self, warm_requests: int = 20) -> None:
        """Warm: the rows of the good photo, then `warm_requests` more; the RSS after them."""
        first = self.good()
        assert first.status == 200, (first.status, first.body[:500])
        self.expected = first.json()
        for _ in range(warm_requests):
            assert self.answers_right(self.good())
        self.pid = biggest(self.pid)
        self.memory = Memory(self.pid)
        self.warm = self.memory.rss()

    def case(self, name: str, attack: Callable[[], list[Reply]]) -> Result:
        assert self.memory is not None, "start() first"
        self.memory.reset()
        t0 = time.monotonic()
        replies = attack()
        seconds = time.monotonic() - t0
        peak = self.memory.peak() - self.warm
        ok = self.answers_right(self.good())
        statuses = [r.status for r in replies]
        shown = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
        status = " ".join(f"{s}" if n == 1 else f"{s} x{n}" for s, n in shown.items())
        result = Result(name, status, seconds, peak, ok)
        result.sent = max(r.sent for r in replies)
        result.answer_bytes = max(len(r.body) for r in replies)
        print(
            f"{name}: {status}, {seconds:.1f} s, {peak / MiB:+.0f} MiB, good after: {ok}",
            flush=True,
        )
        for reply in replies[:1]:
            result.notes.append(reply.body[:300].decode("utf-8", "replace"))
        return result

    # each attack: the replies of its hostile requests

    def big_body(self, chunked: bool) -> list[Reply]:
        body = repeat(b'{"inputs": "', 300 * 10**6)
        kw: dict[str, Any] = {"chunked": True} if chunked else {"content_length": 300 * 10**6}
        return [send(self.port, body, JSON | self.auth, **kw)]

    def nested(self, side: int = 4000) -> list[Reply]:
        total, pieces = nested_photo(side)
        return [send(self.port, pieces, JSON | self.auth, content_length=total)]

    def concurrent_pngs(self, big: bytes, n: int = 6) -> list[Reply]:
        body = records([big])
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: send(self.port, body, JSON | self.auth), range(n)))

    def many_photos(self, tiny: bytes, n: int = 5000) -> list[Reply]:
        return [send(self.port, records([tiny] * n), JSON | self.auth)]

    def bomb(self, bomb: bytes) -> list[Reply]:
        return [send(self.port, records([bomb]), JSON | self.auth)]

    def invalid_json(self, size: int = 20 * MiB) -> list[Reply]:
        body = b'{"inputs": {"image": ["' + b"A" * size
        return [send(self.port, body, JSON | self.auth)]

    def no_content_type(self) -> list[Reply]:
        return [send(self.port, good_body(self.photo), self.auth)]

    def slow_senders(self, n: int = 50) -> list[Reply]:
        """`n` clients that announce 1,000 bytes and send 10; meanwhile the good request."""
        socks = []
        head = (
            f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self.auth.items())
            + "\r\n"
        )
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=600)
            sock.sendall(head.encode() + b'{"inputs":')
            socks.append(sock)
        try:
            during = self.good()
            assert self.answers_right(during), (during.status, during.body[:300])
            replies = []
            for sock in socks:
                status, headers, body = _read_reply(sock, 600)
                replies.append(Reply(status, headers, body, 10))
            return replies
        finally:
            for sock in socks:
                sock.close()

    def arrays(self) -> list[Reply]:
        return [
            send(self.port, pixel_array(0.5), JSON | self.auth),
            send(self.port, pixel_array("NaN"), JSON | self.auth),
        ]

    def run(self, mixed: int) -> tuple[list[Result], int]:
        """Every case, then `mixed` requests of the cheap kinds (4 clients); the results and
        the RSS after them."""
        big, bomb, tiny = png(7000, 7000), png(20000, 20000), png(4, 4)
        cases: list[tuple[str, Callable[[], list[Reply]]]] = [
            ("300 MB body, Content-Length", lambda: self.big_body(False)),
            ("300 MB body, chunked", lambda: self.big_body(True)),
            ("nested-list photo, 224 MB JSON", self.nested),
            ("6 concurrent 49 MP PNGs", lambda: self.concurrent_pngs(big)),
            ("5,000 photos in one request", lambda: self.many_photos(tiny)),
            ("400 MP PNG bomb", lambda: self.bomb(bomb)),
            ("invalid 20 MB JSON", self.invalid_json),
            ("no Content-Type", self.no_content_type),
            ("50 slow senders", self.slow_senders),
            ("float 0..1 and NaN arrays", self.arrays),
        ]
        results = [self.case(name, attack) for name, attack in cases]
        kinds: list[Callable[[], Reply]] = [
            self.good,
            lambda: send(self.port, records([self.photo] * 4), JSON | self.auth),
            lambda: self.invalid_json(1000)[0],
            lambda: self.no_content_type()[0],
            lambda: self.arrays()[0],
            lambda: self.many_photos(tiny, 65)[0],
            lambda: send(
                self.port, repeat(b"x", 40 * 10**6), JSON | self.auth, content_length=40 * 10**6
            ),
        ]
        assert self.memory is not None
        self.memory.reset()
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda i: kinds[i % len(kinds)]().status, range(mixed)))
        shown = {s: statuses.count(s) for s in sorted(set(statuses))}
        ok = self.answers_right(self.good())
        mixed_result = Result(
            f"{mixed} mixed requests, 4 clients",
            " ".join(f"{s} x{n}" for s, n in shown.items()),
            time.monotonic() - t0,
            self.memory.peak() - self.warm,
            ok,
        )
        results.append(mixed_result)
        return results, self.memory.rss()


def table(results: list[Result], warm: int, final: int) -> str:
    lines = [
        f"warm RSS {warm / MiB:.0f} MiB; after the battery {final / MiB:.0f} MiB "
        f"({final / warm:.3f} x warm)",
        f"{'case':38} {'status':22} {'seconds':>8} {'peak - warm MiB':>16} good after",
    ]
    for r in results:
        lines.append(
            f"{r.case:38} {r.status:22} {r.seconds:8.2f} {r.peak_over_warm / MiB:16.0f} "
            f"{'200, same rows' if r.good else 'NO'}"
        )
    return "\n".join(lines)
