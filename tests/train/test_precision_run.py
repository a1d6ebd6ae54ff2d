"""precision=bf16/fp16 through the runner (issue #18): a tiny real run per engine kind, and the refusals."""

import pytest
from conftest import assert_eps_spent

from dptrain import keys as key
from dptrain.errors import UserError


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("engine", ["mixed_ghost", "nonprivate"])
def test_mixed_precision_run(quick, engine, precision):
    s, _ = quick(f"engine={engine}", f"precision={precision}")
    assert s[key.CONFIG]["precision"] == precision
    assert s[key.TRAIN_LOSS] == s[key.TRAIN_LOSS]  # finite, not NaN
    if engine != "nonprivate":
        assert_eps_spent(s, target=s[key.EPS])  # the ledger's composition, within the calibration's 0.5%


@pytest.mark.slow
def test_two_pass_bf16_run_spends_the_target(quick):
    s, _ = quick("engine=mixed_ghost", "engine.passes=2", "precision=bf16")
    assert s[key.CONFIG]["precision"] == "bf16"
    assert s[key.TRAIN_LOSS] == s[key.TRAIN_LOSS]  # finite, not NaN
    assert_eps_spent(s, target=s[key.EPS])  # the ledger's composition, within the calibration's 0.5%


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "match"), [
    (("engine=opacus_ghost", "precision=bf16"), "precision=bf16 needs engine=opacus"),
    (("engine.passes=2", "precision=fp16"), "precision=fp16 needs engine.passes=1"),
    (("precision=fp8",), "unknown precision 'fp8'"),
])
def test_mixed_precision_refusals(quick, overrides, match):
    with pytest.raises(UserError, match=match):
        quick(*overrides)
