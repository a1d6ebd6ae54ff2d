"""Feature-level augmentation that stays exact: dataset.features + dataset.augment stores the features of each image
and of its mirror image as two fixed views, trained on as one example (privacy.augmult=2)."""

import pytest
import torch
from conftest import assert_eps_spent
from torch.utils.data import TensorDataset

from dptrain import keys as key
from dptrain.data.datasets import Data, _dp_normalize, _validation_split, create_dataset
from dptrain.errors import UserError
from dptrain.train.loop import train_one_epoch


def test_the_second_view_is_the_scattering_of_the_mirror_image():
    """(N, 2, 81·C, H/4, W/4): view 0 the image's features (as without augment), view 1 its mirror image's —
    computed, since a flip also permutes the ScatterNet's angles; the evaluation split has one view."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    data = create_dataset("fake", size=8, image_size=16, features="scattering", augment=True)
    plain = create_dataset("fake", size=8, image_size=16, features="scattering")
    raw = create_dataset("fake", size=8, image_size=16).train.tensors[0]
    x = data.train.tensors[0]
    assert x.shape == (8, 2, 243, 4, 4) and data.views == 2 and (data.in_chans, data.image_size) == (243, 4)
    assert data.test.tensors[0].shape == (2, 243, 4, 4) and plain.views == 1
    assert torch.equal(x[:, 0], plain.train.tensors[0])
    flipped = ScatteringTorch2D(J=2, shape=(16, 16))(raw[3:4].flip(-1)).flatten(1, 2)
    assert torch.allclose(x[3:4, 1], flipped, atol=1e-6)
    assert not torch.allclose(x[3, 1], x[3, 0].flip(-1), atol=1e-3)  # not a flip of the map: the angles move too


def test_held_out_examples_are_evaluated_on_their_first_view():
    x = torch.randn(20, 2, 3, 4, 4)
    data = Data(TensorDataset(x, torch.arange(20)), TensorDataset(x[:2, 0], torch.arange(2)), 2, 3, 4, "t", views=2)
    data = _validation_split(data, 0.25, seed=1)
    xv, yv = data.test.tensors
    assert xv.shape == (5, 3, 4, 4) and torch.equal(xv, x[yv, 0])
    assert data.train.tensors[0].shape == (15, 2, 3, 4, 4)


def test_dp_statistics_take_one_clipped_vector_per_example_over_its_views():
    """The sensitivity stays `clip`: each example's per-channel mean is over both views (and all positions), one
    vector per example, clipped — not one per view. With the noise draws at zero the estimate is exact."""
    torch.manual_seed(0)
    n, C, clip = 30, 3, 4.0
    x = torch.randn(n, 2, C, 4, 4) + torch.tensor([0.5, -1.0, 2.0]).view(1, 1, C, 1, 1)
    x[0] *= 50  # far outside the clip
    m_i = x.double().transpose(1, 2).flatten(2).mean(2)  # (n, C)
    s_i = (x.double().transpose(1, 2).flatten(2) ** 2).mean(2)
    clipped = [(v * (clip / v.norm(dim=1)).clamp(max=1)[:, None]).sum(0) / n for v in (m_i, s_i)]
    xt = torch.randn(4, C, 4, 4)
    data = Data(TensorDataset(x.clone(), torch.zeros(n)), TensorDataset(xt.clone(), torch.zeros(4)), 2, C, 4, "t",
                views=2)
    out = _dp_normalize(data, noise=8.0, clip=clip, normal=lambda k: torch.zeros(k, dtype=torch.float64))
    mean = clipped[0]
    var = torch.maximum(clipped[1] - mean ** 2, 3 * 8.0 * clip / n * (1 + 2 * mean.abs()))  # _dp_normalize's floor
    want = ((x.double() - mean.view(1, 1, C, 1, 1)) / var.sqrt().view(1, 1, C, 1, 1)).float()
    assert torch.allclose(out.train.tensors[0], want, atol=1e-5)
    want_t = ((xt.double() - mean.view(1, C, 1, 1)) / var.sqrt().view(1, C, 1, 1)).float()
    assert torch.allclose(out.test.tensors[0], want_t, atol=1e-5)
    assert out.prior == ((8.0, 1.0, 2),)


class Recorder:
    """An engine stand-in that records what the loop feeds the model."""

    def __init__(self):
        self.model, self.inputs, self.labels, self.steps = torch.nn.Flatten(), [], [], 0

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, out, y, last):
        self.inputs.append(out.detach().clone())
        self.labels.append(y.clone())
        return 0.0

    def step(self):
        self.steps += 1


def test_the_loop_feeds_an_examples_views_as_consecutive_rows():
    """The engine's augmentation multiplicity: rows 2i and 2i+1 are example i's two views (no random augmentation,
    no repeated copy), and the labels are one per example."""
    x, y = torch.randn(10, 2, 3, 2, 2), torch.arange(10)
    rec = Recorder()
    idx = torch.tensor([7, 2, 5])
    train_one_epoch(rec, TensorDataset(x, y), [idx], physical_batch_size=2, device=torch.device("cpu"), augmult=2,
                    views=2)
    rows, labels = torch.cat(rec.inputs), torch.cat(rec.labels)
    assert torch.equal(labels, idx) and rec.steps == 1
    assert torch.equal(rows, x[idx].flatten(0, 1).flatten(1))


@pytest.mark.slow
def test_a_run_trains_on_both_views_and_other_multiplicities_are_refused(compose, tmp_path):
    from dptrain.train.run import run

    base = ["progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=16", "model=scatter_cnn",
            "model.kwargs.width=4", "epochs=1", "batch_size=16", "dataset.features=scattering", "dataset.augment=true"]
    s = run(compose(*base, "privacy.augmult=2", "dataset.normalize=dp"), str(tmp_path / "a"))
    assert s[key.DATASET] == "fake-scattering" and s[key.PRIOR] == [[8.0, 1.0, 2]]
    assert_eps_spent(s, target=3.0)
    for k in (1, 3):
        with pytest.raises(UserError, match=rf"two fixed views of each example .*set privacy.augmult=2 \(got {k}\)"):
            run(compose(*base, f"privacy.augmult={k}"), str(tmp_path / f"b{k}"))


def test_tta_stores_the_test_images_mirror_features_as_a_second_view():
    """dataset.tta with features: the evaluation split is (N, 2, ...) too — the features of each test image and of
    its mirror image (computed, not derived) — and it needs dataset.augment (a validation split's held-out part has
    its mirror features then)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    data = create_dataset("fake", size=8, image_size=16, features="scattering", augment=True, tta=True)
    plain = create_dataset("fake", size=8, image_size=16, features="scattering")
    raw = create_dataset("fake", size=8, image_size=16).test.tensors[0]
    xt = data.test.tensors[0]
    assert xt.shape == (2, 2, 243, 4, 4) and data.test_views == 2 and not data.test_flip
    assert (data.in_chans, data.image_size) == (243, 4) and plain.test_views == 1
    assert torch.equal(xt[:, 0], plain.test.tensors[0])
    assert torch.allclose(xt[:, 1], ScatteringTorch2D(J=2, shape=(16, 16))(raw.flip(-1)).flatten(1, 2), atol=1e-6)
    images = create_dataset("fake", size=8, image_size=16, tta=True)
    assert images.test_flip and images.test_views == 1 and images.test.tensors[0].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="dataset.tta=true with dataset.features=scattering .*dataset.augment=true"):
        create_dataset("fake", size=8, image_size=16, features="scattering", tta=True)


def test_tta_holds_out_both_views_and_normalises_them_alike():
    x = torch.randn(20, 2, 3, 4, 4) + 3
    data = Data(TensorDataset(x, torch.arange(20)), TensorDataset(x[:2], torch.arange(2)), 2, 3, 4, "t", views=2,
                test_views=2)
    data = _validation_split(data, 0.25, seed=1)
    xv, yv = data.test.tensors
    assert xv.shape == (5, 2, 3, 4, 4) and torch.equal(xv, x[yv])
    out = _dp_normalize(data, noise=8.0, clip=100.0, normal=lambda k: torch.zeros(k, dtype=torch.float64))
    xt, xtr = out.test.tensors[0], out.train.tensors[0]
    # one affine map per channel for both splits and both views: recover it from the training split, apply to held-out
    a = (xtr[0, 0, :, 0, 0] - xtr[1, 1, :, 0, 0]) / (x[out.train.tensors[1][0], 0, :, 0, 0]
                                                     - x[out.train.tensors[1][1], 1, :, 0, 0])
    b = xtr[0, 0, :, 0, 0] - a * x[out.train.tensors[1][0], 0, :, 0, 0]
    assert torch.allclose(xt, x[yv] * a.view(3, 1, 1) + b.view(3, 1, 1), atol=1e-4)


def test_evaluate_averages_the_softmax_over_views_or_mirror_images():
    from dptrain.train.loop import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(7, 2, 3, 2, 2), torch.randint(0, 3, (7,))
    cpu = torch.device("cpu")
    with torch.no_grad():
        p = (model(x[:, 0]).softmax(-1) + model(x[:, 1]).softmax(-1)) / 2
        q = (model(x[:, 0]).softmax(-1) + model(x[:, 0].flip(-1)).softmax(-1)) / 2
    for got, probs in ((evaluate(model, TensorDataset(x, y), device=cpu, batch_size=3, views=2), p),
                       (evaluate(model, TensorDataset(x[:, 0], y), device=cpu, batch_size=3, flip=True), q)):
        assert got["acc"] == pytest.approx((probs.argmax(1) == y).float().mean().item())
        assert got["loss"] == pytest.approx(-probs[torch.arange(7), y].log().mean().item(), rel=1e-5)
    plain = evaluate(model, TensorDataset(x[:, 0], y), device=cpu)
    with torch.no_grad():
        assert plain["loss"] == pytest.approx(torch.nn.functional.cross_entropy(model(x[:, 0]), y).item(), rel=1e-5)


@pytest.mark.slow
def test_a_run_evaluates_with_tta(compose, tmp_path):
    from dptrain.train.run import run

    base = ["progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=16", "epochs=1",
            "batch_size=16", "dataset.tta=true"]
    s = run(compose(*base, "model=scatter_cnn", "model.kwargs.width=4", "dataset.features=scattering",
                    "dataset.augment=true", "privacy.augmult=2", "dataset.normalize=dp"), str(tmp_path / "a"))
    assert 0 <= s[key.TEST_ACC] <= 1 and s[key.CONFIG]["dataset"]["tta"] is True
    s = run(compose(*base), str(tmp_path / "b"))
    assert 0 <= s[key.TEST_ACC] <= 1
