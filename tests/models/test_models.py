"""create_model: names, BatchNorm → GroupNorm, heads, checkpoints the tests save."""

import pytest
import torch
from torch import nn

from dptrain.errors import UserError
from dptrain.models.factory import conf_models, create_model


def test_cnn_on_digits_and_cifar_sizes():
    m = create_model("cnn", num_classes=10, in_chans=1)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    m = create_model("cnn", num_classes=100, in_chans=3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_timm_batchnorm_converted_and_head_matches():
    m = create_model("resnet18", num_classes=7)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert any(isinstance(x, nn.GroupNorm) for x in m.modules())
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_vit_takes_the_data_size():
    m = create_model("vit_tiny", num_classes=10, img_size=32, patch_size=4, depth=1)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match="unknown model 'nonet'; conf names: " + ", ".join(sorted(conf_models()))):
        create_model("nonet", num_classes=10)


def test_the_conf_names_are_the_conf_files():
    """conf/model is the one list of model names: each option maps to the model.name its file sets."""
    names = conf_models()
    assert "cnn" in names and names["vit_tiny"] == "vit_tiny_patch16_224" and names["vgg11"] == "vgg11_bn"


def test_checkpoint_round_trip_and_head_swap(tmp_path):
    src = create_model("resnet18", num_classes=10)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "ck.pt")
    same = create_model("resnet18", num_classes=10, checkpoint=str(tmp_path / "ck.pt"))
    for (k, a), b in zip(src.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), k
    other = create_model("resnet18", num_classes=3, checkpoint=str(tmp_path / "ck.pt"))  # head skipped
    assert torch.equal(other.conv1.weight, src.conv1.weight) and other.fc.out_features == 3


def test_checkpoint_of_the_batchnorm_architecture(tmp_path):
    import timm

    bn = timm.create_model("resnet18", num_classes=5)
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    m = create_model("resnet18", num_classes=5, checkpoint=str(tmp_path / "bn.pt"))
    assert torch.equal(m.conv1.weight, bn.conv1.weight)


def test_corrupt_and_missing_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        create_model("cnn", num_classes=10, checkpoint=str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="not found"):
        create_model("cnn", num_classes=10, checkpoint=str(tmp_path / "none.pt"))


def test_cnn_settings_on_a_timm_name_get_a_hint():
    with pytest.raises(UserError, match="model=timm model.name=resnet18"):
        create_model("resnet18", num_classes=3, channels=[4], hidden=4, act="tanh", norm="none")


def test_scatter_cnn_bad_activation_is_one_line():
    with pytest.raises(UserError, match="unknown model.kwargs.act 'elu'; valid: tanh, relu"):
        create_model("scatter_cnn", num_classes=10, in_chans=243, img_size=8, act="elu")


@pytest.mark.parametrize(("short", "full"), [("beit", "beit_base"), ("vit", "vit_base"), ("resnet", "resnet18"),
                                             ("vgg", "vgg11")])
def test_short_model_names_compose_to_their_documented_size(compose, short, full):
    """`dptrain model=beit` is BEiT-base (the paper's fine-tuning default), and likewise vit, resnet, vgg."""
    assert compose(f"model={short}").model.name == conf_models()[full] == conf_models()[short]


@pytest.mark.parametrize("engine", ["opacus", "opacus_ghost"])
def test_opacus_on_beit_is_one_line_naming_the_module(engine):
    import timm

    from dptrain.engines import create_engine

    model = timm.create_model("beit_base_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                              num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError) as err:
        create_engine(engine, model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "'blocks.0.attn' (Attention" in msg and "engine=mixed_ghost" in msg
    assert not any(type(m).__name__ == "_Cloned" for m in model.modules())  # refused before anything was wrapped


class _WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 8))
        self.blocks.append(nn.MultiheadAttention(8, 2, batch_first=True))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks[0](x)
        return self.head(self.blocks[1](x, x, x)[0].mean(1))


@pytest.mark.parametrize("engine", ["opacus", "opacus_ghost"])
def test_opacus_validator_refusal_is_one_line_naming_the_module(engine):
    """A module Opacus' ModuleValidator refuses (nn.MultiheadAttention): its message names neither the module nor
    another engine; dptrain's does both, on one line."""
    from dptrain.engines import create_engine

    model = _WithMHA()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError) as err:
        create_engine(engine, model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    msg = str(err.value)
    assert "\n" not in msg and "'blocks.1' (MultiheadAttention" in msg and "engine=mixed_ghost" in msg


def test_every_batchnorm_subclass_is_converted_keeping_timm_fused_activation(caplog):
    """timm's BatchNormAct2d (EfficientNet & co.) is a BatchNorm subclass Opacus' fixer misses: converted to
    GroupNorm followed by its activation, and the log counts what was converted."""
    import logging

    import timm

    want = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for m in timm.create_model("efficientnet_b0", num_classes=3).modules())
    with caplog.at_level(logging.INFO, logger="dptrain.models"):
        m = create_model("efficientnet_b0", num_classes=3)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert f"converted {want} BatchNorm layers" in caplog.text and want == 49
    fused = m.bn1  # was BatchNormAct2d(32, act=SiLU)
    assert isinstance(fused[0], nn.GroupNorm) and isinstance(fused[-1], nn.SiLU)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_model_timm_without_a_name_is_an_error(compose):
    cfg = compose("model=timm")
    with pytest.raises(UserError, match="model=timm needs a timm model name: dptrain model=timm model.name="):
        create_model(cfg.model.name, num_classes=3)


def test_checkpoint_provenance_reads_the_run_beside_it(tmp_path, caplog):
    """model.pt in a dptrain run directory: that run's ε, δ, dataset and its own checkpoint's provenance (a chain
    of continued runs stays visible); a warning says the budgets compose. No summary: the path only."""
    import json

    from dptrain import keys as key
    from dptrain.models.factory import checkpoint_provenance

    assert checkpoint_provenance(None, dataset="digits") is None
    earlier = {"path": "/runs/0/model.pt", "summary": "/runs/0/summary.json", key.EPS_SPENT: 1.0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    (run / "summary.json").write_text(json.dumps({
        key.EPS_SPENT: 2.5, key.EPS: 3.0, key.DELTA: 1e-5, key.ACCOUNTANT: "prv", key.EPS_GUARANTEED: True,
        key.STEPS: 90, key.DATASET: "digits", key.MODEL: "cnn", key.ENGINE: "ghost", key.NAME: "a", key.COMMIT: "c0",
        key.CHECKPOINT: earlier, key.TEST_ACC: 0.9}))
    with caplog.at_level("WARNING", logger="dptrain.models"):
        p = checkpoint_provenance(str(run / "model.pt"), dataset="digits")
    assert p == {"path": str(run / "model.pt"), "summary": str(run / "summary.json"), key.EPS_SPENT: 2.5,
                 key.EPS: 3.0, key.DELTA: 1e-5, key.ACCOUNTANT: "prv", key.EPS_GUARANTEED: True, key.STEPS: 90,
                 key.DATASET: "digits", key.MODEL: "cnn", key.ENGINE: "ghost", key.NAME: "a", key.COMMIT: "c0",
                 key.CHECKPOINT: earlier}
    assert "spent eps=2.5 (delta=1e-05) on dataset 'digits'; this run trains on 'digits'" in caplog.text
    assert "the budgets compose" in caplog.text

    (run / "summary.json").write_text(json.dumps({key.EPS_SPENT: None, key.DATASET: "cifar10"}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="dptrain.models"):
        assert checkpoint_provenance(str(run / "model.pt"), dataset="digits")[key.EPS_SPENT] is None
    assert "trained WITHOUT privacy on dataset 'cifar10'" in caplog.text

    (tmp_path / "w.pt").write_bytes(b"")
    assert checkpoint_provenance(str(tmp_path / "w.pt"), dataset="digits") == {"path": str(tmp_path / "w.pt"),
                                                                               "summary": None}
