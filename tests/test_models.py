from __future__ import annotations

import pytest
import torch

from agegender.config import ModelConfig
from agegender.models import LRN, build_model, count_parameters, feature_side


def test_paper_size_parameter_count_and_shapes() -> None:
    model = build_model("multitask", 227, seed=0)
    assert count_parameters(model) == 11_416_074
    sides = []
    x = torch.zeros(2, 3, 227, 227)
    for layer in model.features:
        x = layer(x)
        if isinstance(layer, torch.nn.MaxPool2d):
            sides.append(x.shape[-1])
    conv1 = model.features[0](torch.zeros(1, 3, 227, 227))
    assert [conv1.shape[-1], *sides] == [56, 28, 14, 7]
    out = model(torch.zeros(2, 3, 227, 227))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"age": (2, 8), "gender": (2, 2)}


@pytest.mark.parametrize(
    ("task", "heads"), [("multitask", {"age", "gender"}), ("age", {"age"}), ("gender", {"gender"})]
)
def test_small_inputs_and_heads(task: str, heads: set[str]) -> None:
    model = build_model(task, 64, ModelConfig(norm="batchnorm"), seed=0)  # type: ignore[arg-type]
    assert feature_side(64) == 1
    out = model(torch.zeros(3, 3, 64, 64))
    assert set(out) == heads
    assert all(v.shape[0] == 3 for v in out.values())
    with pytest.raises(ValueError, match="too small"):
        build_model("age", 20)


def test_caffe_initialisation_is_seeded() -> None:
    a, b = build_model("multitask", 64, seed=1), build_model("multitask", 64, seed=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    fc6 = a.fc[1]
    assert isinstance(fc6, torch.nn.Linear)
    assert torch.all(fc6.bias == 1.0)
    assert abs(float(fc6.weight.detach().std()) - 0.005) < 0.0005
    conv1, other = a.features[0], build_model("multitask", 64, seed=2).features[0]
    assert isinstance(conv1, torch.nn.Conv2d)
    assert isinstance(other, torch.nn.Conv2d)
    assert abs(float(conv1.weight.detach().std()) - 0.01) < 0.001
    assert not torch.equal(other.weight, conv1.weight)


def test_dropout_uses_the_given_generator() -> None:
    model = build_model("multitask", 64, seed=0).train()
    x = torch.randn(4, 3, 64, 64)
    outs: list[torch.Tensor] = []
    for _ in range(2):
        model.set_generator(torch.Generator().manual_seed(5))
        torch.manual_seed(123 + len(outs))  # the global RNG must not matter
        outs.append(model(x)["age"])
    assert torch.equal(outs[0], outs[1])


def test_lrn_is_torchs_without_avg_pool3d() -> None:
    """Our LRN (deterministic on CUDA) computes what nn.LocalResponseNorm computes."""
    x = torch.randn(3, 96, 7, 7) * 60
    ref = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(x)
    assert torch.allclose(LRN()(x), ref, rtol=1e-5, atol=1e-5)


def test_caffe_biases_follow_the_released_prototxt_and_pytorch_init_is_seeded() -> None:
    model = build_model("multitask", 64, seed=0)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [float(c.bias.detach().unique()) for c in convs if c.bias is not None] == [0, 1, 0]
    heads = [h for h in model.heads.values() if isinstance(h, torch.nn.Linear)]
    assert len(heads) == 2
    assert all(float(h.bias.detach().abs().max()) == 0 for h in heads)
    config = ModelConfig(norm="batchnorm", init="pytorch")
    a, b = build_model("age", 64, config, seed=3), build_model("age", 64, config, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    fc6 = a.fc[1]
    assert isinstance(fc6, torch.nn.Linear)
    bound = 1 / fc6.weight.shape[1] ** 0.5
    assert bound * 0.9 < float(fc6.weight.detach().abs().max()) <= bound * (1 + 1e-5)
