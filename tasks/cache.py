"""The decode-once image cache as a Prefect task, and progress as run-log lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agegender.cache import build_cache
from agegender.config import CacheConfig, Resize


def logged_progress(label: str, steps: int = 10) -> Callable[[int, int], None]:
    """A (done, total) callback that logs about `steps` lines with the throughput."""
    start = time.perf_counter()
    shown = [-1]

    def update(done: int, total: int) -> None:
        step = done * steps // max(total, 1)
        if step > shown[0]:
            shown[0] = step
            rate = done / max(time.perf_counter() - start, 1e-9)
            get_run_logger().info(f"{label}: {done:,}/{total:,} images ({rate:,.0f} img/s)")

    return update


@task(cache_policy=NO_CACHE)
def prepare_cache_task(
    data_root: str, cache_dir: str, image_size: int, resize: Resize = "antialias"
) -> str:
    """Decode-once cache of the data root (a no-op when it is up to date)."""
    res = build_cache(
        data_root,
        cache_dir,
        config=CacheConfig(image_size=image_size, resize=resize),
        progress=logged_progress("decoding Adience"),
    )
    get_run_logger().info(
        f"cache {cache_dir}: {res.images} images, decoded {res.decoded}, "
        f"skipped {len(res.problems)} (fingerprint {res.fingerprint[:12]})"
    )
    return cache_dir
