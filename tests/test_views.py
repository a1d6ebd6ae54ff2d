"""Feature-level augmentation that stays exact: dataset.features + dataset.augment stores the features of each image
and of its mirror image as two fixed views, trained on as one example (privacy.augmult=2)."""

import pytest
import torch
from conftest import assert_eps_spent
from torch.utils.data import TensorDataset

from dptrain import schema as key
from dptrain.data import Data, _dp_normalize, _validation_split, create_dataset
from dptrain.errors import UserError
from dptrain.loop import train_one_epoch


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


def test_a_run_trains_on_both_views_and_other_multiplicities_are_refused(compose, tmp_path):
    from dptrain.run import run

    base = ["progress=false", "dataset=fake", "dataset.size=32", "dataset.image_size=16", "model=scatter_cnn",
            "model.kwargs.width=4", "epochs=1", "batch_size=16", "dataset.features=scattering", "dataset.augment=true"]
    s = run(compose(*base, "privacy.augmult=2", "dataset.normalize=dp"), str(tmp_path / "a"))
    assert s[key.DATASET] == "fake-scattering" and s[key.PRIOR] == [[8.0, 1.0, 2]]
    assert_eps_spent(s, target=3.0)
    for k in (1, 3):
        with pytest.raises(UserError, match=rf"two fixed views of each example .*set privacy.augmult=2 \(got {k}\)"):
            run(compose(*base, f"privacy.augmult={k}"), str(tmp_path / f"b{k}"))
