"""Process-wide settings that folds training at once share (`agegender.runtime`): the first run
in sets them, the last one out restores them, a run asking for another value meanwhile is
refused; on a CPU a run has no stream to reserve."""

from __future__ import annotations

import threading

import pytest
import torch

from agegender.runtime import SettingError, determinism, float_precision, reserved_stream


def test_the_last_run_out_restores_and_a_different_run_is_refused() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    first_in = threading.Event()
    first_out = threading.Event()
    seen: list[bool] = []

    def first() -> None:  # a fold that finishes while another still trains
        with determinism(True):
            first_in.set()
            seen.append(torch.are_deterministic_algorithms_enabled())
        first_out.set()

    with determinism(True):
        worker = threading.Thread(target=first)
        worker.start()
        first_in.wait(10)
        worker.join(10)
        assert first_out.is_set()
        assert torch.are_deterministic_algorithms_enabled()  # still held by this run
        with (
            pytest.raises(SettingError, match=r"train\.deterministic=false, but 1 run"),
            determinism(False),
        ):
            pass
        assert torch.are_deterministic_algorithms_enabled()
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()  # restored by the last one out
    with determinism(False):  # nobody holds it now: any value may come
        assert not torch.are_deterministic_algorithms_enabled()


def test_precision_and_streams_on_a_cpu() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    cpu = torch.device("cpu")
    with float_precision("tf32", cpu), float_precision("fp32", cpu):  # no flag on a CPU
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with reserved_stream(cpu) as stream:
        assert stream is None
