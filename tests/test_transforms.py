from __future__ import annotations

import numpy as np
import torch

from agegender.metrics import head_metrics
from agegender.models import masked_losses
from agegender.transforms import (
    Normalize,
    center_crop,
    crop_batch,
    random_crop_flip,
    random_window,
    ten_crops,
)

IMAGES = torch.arange(2 * 10 * 12 * 3, dtype=torch.int64).reshape(2, 10, 12, 3).to(torch.uint8)


def test_crop_batch_matches_slicing_and_mirrors() -> None:
    top, left, flip = torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([False, True])
    out = crop_batch(IMAGES, top, left, 6, flip)
    assert out.shape == (2, 6, 6, 3)
    assert torch.equal(out[0], IMAGES[0, 1:7, 2:8])
    assert torch.equal(out[1], IMAGES[1, 3:9, 0:6].flip(1))


def test_random_crops_come_from_the_generator() -> None:
    a = random_crop_flip(IMAGES, 6, torch.Generator().manual_seed(0))
    b = random_crop_flip(IMAGES, 6, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # every crop is a window of its own image (maybe mirrored)
    for i in range(2):
        windows = [IMAGES[i, t : t + 6, s : s + 6] for t in range(5) for s in range(7)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(1)) for w in windows)


def test_center_and_ten_crops() -> None:
    assert torch.equal(center_crop(IMAGES, 6), IMAGES[:, 2:8, 3:9])
    crops = ten_crops(IMAGES, 6)
    assert len(crops) == 10
    assert torch.equal(crops[0], IMAGES[:, 0:6, 0:6])
    assert torch.equal(crops[3], IMAGES[:, 4:10, 6:12])
    assert torch.equal(crops[4], center_crop(IMAGES, 6))
    assert all(torch.equal(crops[i + 5], crops[i].flip(2)) for i in range(5))


def test_normalize_measures_and_applies() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    norm = Normalize.measure(images, np.arange(40), "channel_mean_std")
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(norm.mean, flat.mean(0), rtol=1e-6)
    assert norm.std is not None
    np.testing.assert_allclose(norm.std, flat.std(0), rtol=1e-4)
    x = norm(torch.from_numpy(images))
    assert x.shape == (40, 8, 8, 3)
    # crops of the uint8 images, normalised: the numbers of normalising first, then cropping
    top, left, flip = window = random_window(x, 5, torch.Generator().manual_seed(1))
    assert torch.equal(
        norm.crops(torch.from_numpy(images), 5, window), crop_batch(x, top, left, 5, flip)
    )
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1) < 1e-2
    assert norm.describe()["kind"] == "channel_mean_std"


def test_mean_image_is_caffes_mean_file() -> None:
    """Per-pixel mean of the given images, subtracted on the 0-255 scale, no division; cropping
    after the subtraction equals Caffe's (image - mean) at the crop's offsets, mirrored too."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 10, 12, 3), dtype=np.uint8)
    norm = Normalize.measure(images, np.arange(20), "mean_image")
    np.testing.assert_allclose(norm.mean, images[:20].astype(np.float64).mean(0), rtol=1e-6)
    assert (norm.kind, norm.std, norm.describe()["shape"]) == ("mean_image", None, [10, 12, 3])
    batch = torch.from_numpy(images[20:22])
    out = random_crop_flip(norm(batch), 6, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)  # the same draws as random_crop_flip makes
    t = torch.randint(0, 5, (2,), generator=gen)
    s = torch.randint(0, 7, (2,), generator=gen)
    f = torch.rand(2, generator=gen) < 0.5
    mean = torch.from_numpy(norm.mean)
    for i in range(2):
        a, b = int(t[i]), int(s[i])
        want = batch[i, a : a + 6, b : b + 6].float() - mean[a : a + 6, b : b + 6]
        assert torch.allclose(out[i], want.flip(1) if f[i] else want)
    # the training path crops the uint8 images and the mean image alike: the same numbers
    window = random_window(batch, 6, torch.Generator().manual_seed(4))
    assert torch.equal(norm.crops(batch, 6, window), out)
    # the raw 0-255 scale: what Caffe's N(0, 0.01) initialisation expects
    assert float(norm(batch).abs().max()) > 50
    again = Normalize.from_state(norm.state())
    assert torch.equal(again(batch), norm(batch))
    chan = Normalize.measure(images, np.arange(20), "channel_mean")
    assert chan.std is None
    np.testing.assert_allclose(chan.mean, norm.mean.reshape(-1, 3).mean(0), rtol=1e-5)


def test_masked_losses_ignore_missing_labels() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]], requires_grad=True)
    full = masked_losses({"gender": logits}, {"gender": torch.tensor([0, 1, -1])})["gender"]
    expected = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert torch.allclose(full, expected)
    none = masked_losses({"gender": logits}, {"gender": torch.tensor([-1, -1, -1])})["gender"]
    assert float(none.detach()) == 0.0
    none.backward()  # a batch without labels still backpropagates (zero gradient)
    assert logits.grad is not None
    assert float(logits.grad.abs().sum()) == 0.0


def test_head_metrics() -> None:
    probs = np.eye(8, dtype=np.float32)[[0, 1, 3, 7, 7]]
    m = head_metrics(probs, np.array([0, 2, 3, 6, -1]), "age")
    assert m["age_n"] == 4
    assert m["age_acc"] == 0.5
    assert m["age_1off"] == 1.0  # 1 vs 2 and 7 vs 6 are adjacent groups
    assert m["age_per_class"][0] == 1.0
    assert m["age_per_class"][2] == 0.0
    assert m["age_per_class"][4] is None
    assert np.array(m["age_confusion"]).sum() == 4


def test_head_metrics_user_clustered_intervals() -> None:
    """Users a and b each have one right and one wrong exact age (both 1-off right): every
    resample of the two users scores 0.5 exact and 1.0 1-off; the unlabelled row (user c, all
    wrong) is neither counted nor resampled. Without users there are no interval keys."""
    probs = np.eye(8, dtype=np.float32)[[0, 1, 3, 7, 7]]
    labels = np.array([0, 2, 3, 6, -1])
    m = head_metrics(probs, labels, "age", users=["a", "a", "b", "b", "c"], seed=4)
    assert (m["age_acc"], m["age_acc_ci_low"], m["age_acc_ci_high"]) == (0.5, 0.5, 0.5)
    assert (m["age_1off"], m["age_1off_ci_low"], m["age_1off_ci_high"]) == (1.0, 1.0, 1.0)
    assert not any("_ci_" in k for k in head_metrics(probs, labels, "age"))
