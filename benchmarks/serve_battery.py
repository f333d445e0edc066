"""The hostile battery at full length against a real model server (issue 29, items 3 and 4).

    python benchmarks/serve_battery.py --model URI [--requests 2000] [--server ours|mlflow]

Starts `agegender serve --model URI` (or, for the comparison, today's `mlflow models serve -m
URI --env-manager local`; URI must then be a model MLflow resolves), warms it with 20 good
requests, then sends each hostile case of tests/serve_battery.py followed by a good request, and
`--requests` mixed requests from 4 clients. Prints per case the status, seconds and the server's
peak resident set over warm, then the RSS after the mixed requests against warm. The limits of
the issue: peak <= warm + 1 GiB in every case, after the mixed requests <= warm x 1.15.
`tests/test_serve_battery.py` asserts them with 200 mixed requests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' server and battery helpers

from agegender.synth.photos import group_photo  # noqa: E402
from tests.conftest import free_port, serving  # noqa: E402
from tests.serve_battery import Battery, GiB, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="what `agegender serve --model` takes")
    ap.add_argument("--requests", type=int, default=2000, help="mixed requests after the cases")
    ap.add_argument("--server", choices=["ours", "mlflow"], default="ours")
    args = ap.parse_args()

    port = free_port()
    bin_dir = Path(sys.executable).parent
    if args.server == "ours":
        cmd = [str(bin_dir / "agegender"), "serve", "--model", args.model, "--port", str(port)]
    else:
        cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", args.model]
        cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        group_photo(2, 640, 320, seed=0)[0].save(work / "two.jpg", quality=92)
        env = dict(os.environ) | {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        probe = f"http://127.0.0.1:{port}/ping"
        with serving(cmd, env, work, work / "server.log", probe) as proc:
            battery = Battery(port, proc.pid, (work / "two.jpg").read_bytes())
            battery.start()
            results, final = battery.run(args.requests)
        print(f"server: {args.server}, model {args.model}")
        print(table(results, battery.warm, final))
        over = [r.case for r in results if r.peak_over_warm > GiB or not r.good]
        print(f"cases over warm + 1 GiB or with a wrong answer after: {over or 'none'}")
        print(f"after the mixed requests: {final / battery.warm:.3f} x warm (limit 1.15)")


if __name__ == "__main__":
    main()
