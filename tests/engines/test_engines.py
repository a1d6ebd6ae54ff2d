"""The Engine protocol (engines/base.py): every engine in ENGINES builds on a tiny model, keeps the protocol, and
saves its own state — state_dict → load_state_dict into a fresh engine gives the very next step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dptrain.engines import ENGINES, create_engine
from dptrain.engines.base import Engine, checkpointable

CASES = [(name, "fp32") for name in sorted(ENGINES)] + [("nonprivate", "fp16")]  # fp16: GradScaler's state


def _build(name: str, *, seed: int, precision: str = "fp32"):
    torch.manual_seed(0)  # the same initial weights for every engine
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = create_engine(name, model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                           seed=seed, precision=precision)
    return engine, model, opt


def _step(engine, x, y) -> None:
    with engine.autocast():
        out = engine.model(x)
    engine.backward(out, y, last=True)
    engine.step()


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("name,precision", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_engine_keeps_the_protocol(name, precision):
    engine, _, _ = _build(name, seed=0, precision=precision)
    members = [m for m in vars(Engine) if not m.startswith("_")] + list(Engine.__annotations__)
    assert all(hasattr(engine, m) for m in members), [m for m in members if not hasattr(engine, m)]
    assert checkpointable(engine)
    assert isinstance(engine.detach(), nn.Sequential)


@pytest.mark.parametrize("name,precision", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_a_restored_engine_takes_the_same_next_step(name, precision):
    """After one step, the engine's state, the weights and the optimizer's state go into an engine of another
    seed (other streams): its next step is bit for bit the first engine's."""
    (x1, y1), (x2, y2) = _batches()
    a, model_a, opt_a = _build(name, seed=0, precision=precision)
    _step(a, x1, y1)
    saved = copy.deepcopy((a.state_dict(), model_a.state_dict(), opt_a.state_dict()))
    _step(a, x2, y2)

    restored = []
    for load_engine in (True, False):  # restored; the control: the same engine without its own state
        b, model_b, opt_b = _build(name, seed=1, precision=precision)
        model_b.load_state_dict(saved[1])
        opt_b.load_state_dict(saved[2])
        if load_engine:
            b.load_state_dict(saved[0])
        _step(b, x2, y2)
        restored.append(all(torch.equal(p, q) for p, q in zip(_weights(model_a), _weights(model_b), strict=True)))
    # a private engine's next step depends on its noise stream; nonprivate fp16's on its loss scale
    assert restored == [True, name == "nonprivate" and precision == "fp32"]


def test_an_object_without_state_is_not_checkpointable():
    class Plain:
        def step(self) -> None: ...

    assert not checkpointable(Plain()) and not checkpointable(None)
