"""Training never waits for MLflow (issue 25): one fold trained in a live run on a real tracking
server (`mlflow server`, SQLite), twice in one process, the same server: with the server up
throughout (baseline), then with it SIGKILLed after the run's first epoch was logged and started
again on the same port and store once training has ended (its CPU-heavy start would otherwise
slow the fold on a small machine, which is not waiting). The ratio is the outage run's training
speed over the baseline's, both from epoch 2 to the last (images/s); >= 0.95 means the outage
did not hold training up. Both runs must then hold every epoch once.

    python benchmarks/tracking_outage.py [--iterations 60] [--per-fold 24] [--repeat 2]

The arms alternate `--repeat` times and each keeps its best, as load on a shared machine
changes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' server and outage helpers

from agegender.cache import build_cache  # noqa: E402
from agegender.config import CacheConfig  # noqa: E402
from agegender.synth.adience import write_synthetic  # noqa: E402
from tests.outage import Fold, Server, report, tracked_fold  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--per-fold", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--repeat", type=int, default=2, help="the arms alternate this often")
    a = ap.parse_args()
    args = [f"train.iterations={a.iterations}"]
    bases: list[Fold] = []
    hits: list[Fold] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth = write_synthetic(root / "adience", size=64, per_fold=a.per_fold, seed=3, workers=1)
        build_cache(synth.out, root / "cache", config=CacheConfig(image_size=a.image_size))
        server = Server(root / "server")
        try:  # alternating, so that a load that changes on a shared machine hits both arms
            for i in range(a.repeat):
                bases.append(tracked_fold(server, root / "cache", root / f"base{i}", args, False))
                hits.append(tracked_fold(server, root / "cache", root / f"outage{i}", args, True))
            epochs = len(bases[0].ends)
            print(f"cpu, {a.iterations} iterations, {epochs} epochs a run, best of {a.repeat}")
            for line in report(bases, hits, server.url):
                print(line)
        finally:
            server.close()


if __name__ == "__main__":
    main()
