"""The conf tree composes, is typed, and every group option is valid."""

import os

import pytest
from conftest import CONF
from hydra.errors import ConfigCompositionException


def test_default_config(compose):
    cfg = compose()
    assert cfg.model.name == "cnn" and cfg.dataset.name == "digits" and cfg.engine.name == "mixed_ghost"
    assert cfg.eps == 3.0 and cfg.delta is None and cfg.privacy.accountant == "prv"
    assert cfg.privacy.sampling == "poisson"


@pytest.mark.parametrize("group", ["model", "dataset", "engine", "optimizer", "logger"])
def test_every_group_option_composes(compose, group):
    for f in sorted(os.listdir(os.path.join(CONF, group))):
        extra = ["model.name=convnext_atto"] if f == "timm.yaml" else []  # model=timm needs a name
        cfg = compose(f"{group}={f[:-5]}", *extra)
        assert cfg[group].name


def test_typo_fails_at_compose_time(compose):
    with pytest.raises(ConfigCompositionException, match="max_grad_nrm"):
        compose("max_grad_nrm=1")
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose("optimizer.lrr=0.1")
    with pytest.raises(ConfigCompositionException, match="abc"):
        compose("eps=abc")


def test_headline_overrides(compose):
    cfg = compose("eps=8", "batch_size=64", "engine=opacus", "model=resnet18", "dataset=cifar10")
    assert (cfg.eps, cfg.batch_size, cfg.engine.name, cfg.model.name, cfg.dataset.name) == (
        8.0, 64, "opacus", "resnet18", "cifar10")


def test_defaults_have_one_source(compose):
    """Top-level defaults live in TrainConfig only: conf/train.yaml chooses groups and sets no value (epochs
    was once 10 in the dataclass and 15 in the yaml)."""
    from omegaconf import OmegaConf

    from dptrain.config import TrainConfig

    assert set(OmegaConf.load(os.path.join(CONF, "train.yaml"))) == {"defaults", "hydra"}
    cfg, schema = compose(), TrainConfig()
    assert cfg.epochs == schema.epochs == 15  # what `make demo` runs
    assert (cfg.eps, cfg.delta, cfg.batch_size, cfg.seed) == (schema.eps, schema.delta, schema.batch_size, schema.seed)
