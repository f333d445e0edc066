"""The model server's throughput and latency against `agegender predict` on the same photos.

    python benchmarks/serve.py [--photos 12] [--requests 8] [--crop 227 --image-size 256]

One run, interleaved so that a shared host's drift falls on both sides of every ratio:
- `agegender serve` (a subprocess, default settings) at 1, 4 and 16 concurrent clients sending
  1- and 16-photo requests (each client `--requests` requests): photos/s, p50 and p99 of request
  latency, refusals; each level's "x CLI" is against the mean of the CLI's steady photos/s
  (`predict_paths` in-process, warm) measured just before and just after that level;
- then, with `mlflow models serve` (the old path) up on the same model folder beside it, one
  client sending 1-photo requests to the two servers in turn (`--pairs` pairs, same photo, order
  alternating): both p50s and the median of the per-pair latency ratios.
The model is the paper's net (its weights do not change the speed), saved as the pyfunc model
folder the suite logs; photos are synthetic group photos (JPEG, 1-3 faces).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agegender.detect import FaceDetector
from agegender.predict import Predictor, predict_paths
from agegender.synth.photos import group_photo
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
make_model = importlib.import_module("predict").make_model  # benchmarks/predict.py's paper net


def model_folder(root: Path, crop: int, image_size: int, device: str) -> Path:
    """The pyfunc model folder `Tracker.log_model` logs (checkpoint, code, signature)."""
    import mlflow.pyfunc

    from tracking.serving import AgeGenderModel, input_example, signature

    checkpoint = make_model(root / "best.pt", crop, image_size)
    path = root / "model"
    mlflow.pyfunc.save_model(
        path,
        python_model=AgeGenderModel(),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(REPO / "agegender"), str(REPO / "tracking")],
        model_config={"detect": True, "oversample": False, "device": device},
        signature=signature(("age", "gender")),
        input_example=input_example(),
    )
    return path


def cli_meter(checkpoint: Path, paths: list[str], repeat: int, device: str) -> Callable[[], float]:
    """A function measuring the CLI's steady photos/s now (warmed up once here)."""
    predictor = Predictor.load(checkpoint, device)
    detector = FaceDetector()
    list(predict_paths(predictor, paths, detector=detector))  # warm-up

    def rate() -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            list(predict_paths(predictor, paths, detector=detector))
        return repeat * len(paths) / (time.perf_counter() - start)

    return rate


@contextmanager
def server(cmd: list[str], url: str, log: Path) -> Iterator[str]:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def post(url: str, body: bytes) -> tuple[int, float]:
    req = urllib.request.Request(
        url + "/invocations", body, {"Content-Type": "application/json"}, method="POST"
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        status = exc.code
    return status, time.perf_counter() - start


def load(url: str, photos: list[str], clients: int, per: int, requests: int) -> dict[str, float]:
    """`clients` threads, each sending `requests` requests of `per` photos (in turn)."""
    bodies = [
        json.dumps(
            {"dataframe_records": [{"image": photos[(k + j) % len(photos)]} for j in range(per)]}
        ).encode()
        for k in range(len(photos))
    ]
    latencies: list[float] = []
    refused = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal refused
        for k in range(requests):
            status, seconds = post(url, bodies[(c + k) % len(bodies)])
            with lock:
                if status == 200:
                    latencies.append(seconds)
                else:
                    refused += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "photos_s": len(latencies) * per / wall,
        "p50": _quantile(latencies, 0.5),
        "p99": _quantile(latencies, 0.99),
        "refused": refused,
    }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def paired(ours: str, theirs: str, photos: list[str], pairs: int) -> dict[str, float]:
    """One client, 1-photo requests to the two servers in turn (same photo, order alternating):
    drift of a shared host falls on both; the median of the per-pair ratios is the comparison."""
    bodies = [json.dumps({"dataframe_records": [{"image": p}]}).encode() for p in photos]
    mine: list[float] = []
    other: list[float] = []
    for k in range(pairs):
        body = bodies[k % len(bodies)]
        order = [(ours, mine), (theirs, other)]
        for url, out in order if k % 2 else order[::-1]:
            status, seconds = post(url, body)
            if status != 200:
                raise SystemExit(f"{url} answered {status} to a good request")
            out.append(seconds)
    return {
        "ours": statistics.median(mine),
        "theirs": statistics.median(other),
        "ratio": statistics.median(a / b for a, b in zip(mine, other, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=12, help="distinct photos")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--requests", type=int, default=8, help="per client and level")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--sizes", default="1,16", help="photos per request")
    ap.add_argument("--crop", type=int, default=227)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="CLI passes over the photos")
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N]: the CLI's and both servers'")
    ap.add_argument("--no-mlflow", action="store_true", help="skip `mlflow models serve`")
    ap.add_argument("--pairs", type=int, default=48, help="requests to each server, in turn")
    ap.add_argument("settings", nargs="*", help="agegender serve key=value settings")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        root = Path(tmp)
        paths = []
        for i in range(a.photos):
            path = root / f"photo{i}.jpg"
            group_photo(1 + i % 3, a.width, a.height, seed=i)[0].save(path, quality=90)
            paths.append(str(path))
        encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
        folder = model_folder(root, a.crop, a.image_size, a.device)
        cli = cli_meter(root / "best.pt", paths, a.repeat, a.device)
        port = free_port()
        cmd = [str(Path(sys.executable).with_name("agegender")), "serve", "--model", str(folder)]
        cmd += ["--port", str(port), "--device", a.device, *a.settings]
        url = servers.enter_context(server(cmd, f"http://127.0.0.1:{port}", root / "serve.log"))
        print(
            f"{'server':<22}{'clients':>8}{'photos/req':>11}{'photos/s':>10}{'CLI':>7}{'x CLI':>7}"
            f"{'p50 s':>8}{'p99 s':>8}{'refused':>8}"
        )
        before = cli()
        for per in map(int, a.sizes.split(",")):
            for clients in map(int, a.clients.split(",")):
                r = load(url, encoded, clients, per, a.requests)
                after = cli()
                steady = (before + after) / 2
                before = after
                print(
                    f"{'agegender serve':<22}{clients:>8}{per:>11}{r['photos_s']:>10.1f}"
                    f"{steady:>7.1f}{r['photos_s'] / steady:>7.2f}{r['p50']:>8.3f}"
                    f"{r['p99']:>8.3f}{r['refused']:>8.0f}",
                    flush=True,
                )
        if not a.no_mlflow:
            port = free_port()
            cmd = ["mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local"]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            theirs = servers.enter_context(
                server(cmd, f"http://127.0.0.1:{port}", root / "mlflow.log")
            )
            r = paired(url, theirs, encoded, a.pairs)
            print(
                f"1 client, 1-photo requests in turn ({a.pairs} each): agegender serve p50 "
                f"{r['ours']:.3f} s, mlflow models serve p50 {r['theirs']:.3f} s, median ratio "
                f"{r['ratio']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
