"""The conf tree composes, is typed, and every group option is valid; run.check_config refuses what it must."""

import os

import pytest
from conftest import CONF
from hydra.errors import ConfigCompositionException

from dptrain.config import validate
from dptrain.errors import UserError, check_range
from dptrain.train.run import check_config


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


@pytest.mark.parametrize("group", ["model", "dataset", "engine", "optimizer", "logger"])
def test_group_files_repeat_no_default(group):
    """A group file sets only what differs from its dataclass's defaults (sgd.yaml once repeated lr 0.1 and
    momentum 0.9, wandb.yaml the project and mode): a default changed in config.py must reach every group."""
    from omegaconf import OmegaConf

    from dptrain.config import TrainConfig

    schema = getattr(TrainConfig(), group)
    # pinned on purpose: regime=finetune sets automatic clipping, which Opacus does not have (listed after the regime)
    pinned = {"opacus.yaml": {"clipping"}, "opacus_ghost.yaml": {"clipping"}} if group == "engine" else {}
    for f in sorted(os.listdir(os.path.join(CONF, group))):
        values = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, group, f)))
        values = {k: v for k, v in values.items() if k not in pinned.get(f, ()) and k != "defaults"}
        repeated = {k: v for k, v in values.items() if k != "name" and getattr(schema, k, object()) == v}
        assert not repeated, f"conf/{group}/{f} repeats config.py's defaults {repeated}"


def test_every_numeric_knob_has_a_range():
    """A new int/float knob must get its range in config.RANGES (or a reason in UNRANGED): nothing numeric reaches
    training unchecked."""
    from dptrain.config import RANGES, UNRANGED, numeric_fields

    fields = numeric_fields()
    assert set(fields) == set(RANGES) | set(UNRANGED) and not set(RANGES) & set(UNRANGED)
    assert {k for k, nullable in fields.items() if nullable} == {
        "eps", "delta", "privacy.noise_multiplier", "privacy.ema", "model.img_size", "dataset.image_size",
        "dataset.size", "dataset.num_classes", "dataset.channels"}  # fake's: null under a real dataset


@pytest.mark.parametrize("value,interval,ok", [
    (1e-300, "(0, inf)", True), (0.0, "(0, inf)", False), (float("nan"), "(0, inf)", False),
    (float("inf"), "(0, inf)", False), (-float("inf"), "[0, inf)", False), (0, "[0, 1)", True), (1, "[0, 1)", False),
    (0.999, "[0, 1)", True), (1.0, "(0, 1]", True), (None, "(0, 1)", False), ("1", "(0, 2)", False),
    (True, "[0, 2)", False),
])
def test_check_range(value, interval, ok):
    if ok:
        check_range("x", value, interval)
    else:
        with pytest.raises(UserError, match=r"^x must be .*, got "):
            check_range("x", value, interval)
    check_range("x", None, interval, optional=True)


def test_validate_passes_the_shipped_configs(compose):
    """Every conf file and experiment satisfies the ranges (a range too strict would break a paper row)."""
    from dptrain.config import validate

    validate(compose())
    for group in ("model", "dataset", "engine", "optimizer", "experiment"):
        for f in sorted(os.listdir(os.path.join(CONF, group))):
            extra = ["model.name=convnext_atto"] if f == "timm.yaml" else []
            validate(compose(f"{group}={f[:-5]}", *extra))


def test_unknown_keys_are_refused_with_the_nearest_name(compose):
    """Hydra suggests `+epoch=1` for a misspelled key; the schema cannot refuse an added key, validate() does."""
    with pytest.raises(UserError, match="unknown config key 'epoch'; did you mean 'epochs'"):
        validate(compose("+epoch=1"))
    with pytest.raises(UserError, match="unknown config key 'privacy.foo'; valid: accountant"):
        validate(compose("+privacy.foo=2"))
    validate(compose("model=timm", "model.name=resnet18", "+model.kwargs.drop_rate=0.1"))  # kwargs are free-form


def test_model_kwargs_take_new_keys_without_plus(compose):
    """model.kwargs is open: `model.kwargs.patch_size=4` (the README's vit_tiny line) composes without a leading +,
    on a model file that sets no kwargs; `+` still works, and the rest of the config stays closed."""
    from omegaconf.errors import ConfigAttributeError

    from dptrain.config import validate

    cfg = compose("model=vit_tiny", "model.kwargs.patch_size=4", "+model.kwargs.drop_rate=0.1")
    assert dict(cfg.model.kwargs) == {"patch_size": 4, "drop_rate": 0.1}
    validate(cfg)
    assert compose("model.kwargs.hidden=8").model.kwargs.hidden == 8  # cnn.yaml's own kwargs still override
    with pytest.raises(ConfigCompositionException, match="patch_sz"):
        compose("model.patch_sz=4")
    with pytest.raises(ConfigAttributeError):
        cfg.model.nope = 1


def test_every_conf_option_has_a_registry_entry_and_back():
    """Each group's valid names are one registry's keys (engines.ENGINES, optim.OPTIMIZERS, tracking.LOGGERS; datasets:
    test_data.py): a conf file without an entry would fail only at run time, an entry without a file not at all."""
    from dptrain.engines import ENGINES
    from dptrain.train.optim import OPTIMIZERS
    from dptrain.train.outputs import LOGGERS

    for group, registry in [("engine", ENGINES), ("optimizer", OPTIMIZERS), ("logger", LOGGERS)]:
        names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))
        assert names == sorted(registry), group


def test_bad_numbers_and_unknown_keys_are_refused_before_torch_loads(tmp_path):
    """Issue #15 item 5: a mistake in a number or a key is one line, exit 2, without waiting for torch and timm to
    import (seconds, up to tens of seconds on a busy machine)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dptrain.cli.train import main\nsys.argv = ['dptrain', sys.argv[1], 'hydra.run.dir=.']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    for override, message in (("eps=-1", "eps must be > 0"), ("+epoch=1", "unknown config key 'epoch'")):
        p = subprocess.run([sys.executable, "-c", code, override], capture_output=True, text=True, cwd=tmp_path,
                           timeout=120)
        assert p.stdout.split()[-2:] == ["2", "False"], p.stdout + p.stderr
        errors = [line for line in p.stderr.splitlines() if line.startswith("dptrain: error:")]
        assert len(errors) == 1 and message in errors[0]


@pytest.mark.parametrize("override,message", [
    ("privacy.accountant=moments", "unknown accountant 'moments'; valid: prv, rdp, gdp"),
    ("privacy.sampling=fixed", "unknown privacy.sampling 'fixed'; valid: poisson, shuffle"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier must be > 0"),
    ("max_grad_norm=0", "max_grad_norm must be > 0"),
    ("privacy.noise_multiplier=nan", "privacy.noise_multiplier must be > 0 and finite, got nan"),
    ("eps=inf", "eps must be > 0 and finite, got inf"),
    ("delta=nan", r"delta must be in \(0, 1\), got nan"),
    ("epochs=nan", "epochs must be > 0 and finite, got nan"),
    ("eps=null", r"^eps must be > 0 \(got None\), or give privacy.noise_multiplier$"),
    ("privacy.augmult=2", r"^privacy.augmult=2 needs dataset.augment=true \(identical copies add nothing\)$"),
])
def test_bad_privacy_input_is_refused_by_the_one_check(compose, override, message):
    """run.check_config, before the data loads; the budget (budget.py) then checks only what needs n."""
    with pytest.raises(UserError, match=message):
        check_config(compose(override))


def test_features_with_augmentation_need_augmult_2(compose):
    with pytest.raises(UserError, match="dataset.features=scattering with dataset.augment=true stores two fixed views"):
        check_config(compose("dataset.features=scattering", "dataset.augment=true"))
    check_config(compose("dataset.features=scattering", "dataset.augment=true", "privacy.augmult=2"))
