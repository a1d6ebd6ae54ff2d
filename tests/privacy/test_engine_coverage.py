"""Issue #15 items 1–3 on the engine side: recurrent layers (refused with the fix, or exact through Opacus'
DPLSTM/DPGRU), InstanceNorm, an empty batch — a CoverageError naming the parameter, or exact against the
float64 reference; never an internal error."""

import pytest
import torch
import torch.nn.functional as F
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import nn

from dptrain.privacy import CoverageError, PrivacyEngine
from dptrain.testing import check

MODES = ["mixed_ghost", "ghost", "per_sample"]


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.fc = cls(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def data(sizes=(3, 2), T=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, T, 4, generator=g), torch.randint(0, 3, (b,), generator=g)) for b in sizes]


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_fused_recurrent_layers_are_refused_with_the_dp_layer_to_use(cls):
    with pytest.raises(CoverageError, match=f"rnn.weight_ih_l0.*{cls.__name__}.*opacus.layers.DP"):
        PrivacyEngine(Recurrent(cls))


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", [DPLSTM, DPGRU, DPRNN])
def test_opacus_dp_recurrent_layers_are_exact(cls, mode, passes):
    """Each weight is registered under two names (an alias on the layer): one use, not tied weights; the
    Linear cells run once per time step (module reuse), no fallback."""
    torch.manual_seed(0)
    err, engine = check(Recurrent(cls), data(), mode=mode, max_grad_norm=0.5, passes=passes)
    assert err < 1e-12 and engine.fallback_share == 0.0


def test_really_tied_weights_are_still_refused():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(CoverageError, match="tied"):
        PrivacyEngine(nn.Sequential(a, nn.Tanh(), b))


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2])
def test_instance_norm_is_exact(dims, mode, passes):
    conv, norm = (nn.Conv1d, nn.InstanceNorm1d) if dims == 1 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 4, 3), norm(4, affine=True), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 ** dims, 3))
    with torch.no_grad():
        model[1].weight.add_(torch.randn(4) * 0.3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 3, *([6] * dims), generator=g), torch.randint(0, 3, (b,), generator=g)) for b in (3, 2)]
    err, engine = check(model, batches, mode=mode, max_grad_norm=0.5, passes=passes)
    assert err < 1e-12 and engine.fallback_share == 0.0


def test_instance_norm_with_running_stats_is_refused():
    with pytest.raises(CoverageError, match="InstanceNorm '1' has track_running_stats=True"):
        PrivacyEngine(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)))


@pytest.mark.parametrize("passes", [1, 2])
def test_an_empty_batch_adds_nothing(passes):
    """A Poisson batch can be empty: no error, no gradient, then the next batch clips as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    engine = PrivacyEngine(model, max_grad_norm=1.0, passes=passes)
    F.cross_entropy(model(torch.randn(0, 4)), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert engine.per_sample_norms.shape == (0,)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 2]), reduction="sum").backward()
    assert engine.per_sample_norms.shape == (3,)
    engine.detach()
