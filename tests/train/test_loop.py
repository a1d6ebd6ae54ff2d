"""The training loop (train/loop.py): `Position`, where training stands, and train_one_epoch's running sums, which
a run resumed inside an epoch continues from."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.engines import create_engine
from dptrain.errors import Diverged
from dptrain.privacy.sampling import PoissonSampler
from dptrain.train.loop import Position, train_one_epoch


def test_position_counts_the_steps_of_the_epoch_in_progress_and_saves_a_copy():
    at = Position(epoch=1, done=4, seen=60, times=[0.1] * 4, totals={"loss": 2.0, "step_times": [0.2, 0.3]})
    assert at.steps == 6 and Position(done=4).steps == 4
    saved = at.state_dict()
    at.totals["step_times"].append(0.4)  # the loop appends in place after the checkpoint
    back = Position.from_state_dict(saved)
    assert back.steps == 6 and back.totals["loss"] == 2.0 and back.epoch == 1 and back.rows == []


def _run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    engine = create_engine("mixed_ghost", model, torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0,
                           max_grad_norm=1.0, expected_batch_size=4, seed=0)
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16, 3, 2, 2, generator=g), torch.randint(0, 3, (16,), generator=g))
    return engine, model, data


def test_an_epoch_continued_from_its_running_sums_ends_as_one_pass():
    """Two calls — the epoch's first steps, then the rest with the first call's totals (what a mid-epoch checkpoint
    saves) — give the one-call epoch's loss, example count and step count."""
    logical = list(PoissonSampler(16, sample_rate=0.25, steps=5, seed=0))
    engine, model, data = _run()
    whole = train_one_epoch(engine, data, logical, physical_batch_size=2, device=torch.device("cpu"))
    engine, model, data = _run()
    totals = {}
    train_one_epoch(engine, data, logical[:2], physical_batch_size=2, device=torch.device("cpu"), totals=totals)
    assert len(totals["step_times"]) == 2 and totals["examples"] == sum(len(b) for b in logical[:2])
    parts = train_one_epoch(engine, data, logical[2:], physical_batch_size=2, device=torch.device("cpu"),
                            totals=totals)
    assert (parts["loss"], parts["examples"], len(parts["step_times"])) == (whole["loss"], whole["examples"], 5)


def test_a_non_finite_weight_stops_the_epoch_with_the_steps_taken():
    logical = [torch.arange(4)] * 3
    engine, model, data = _run()
    engine.optimizer.noise_multiplier = float("inf")  # the first step's update is infinite
    with pytest.raises(Diverged, match="non-finite weights") as err:
        train_one_epoch(engine, data, logical, physical_batch_size=4, device=torch.device("cpu"))
    assert err.value.steps == 1
