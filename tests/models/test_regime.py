"""The headline command does what users mean: `dptrain model=beit dataset=cifar100 eps=1` fine-tunes
pretrained weights with the seed's recipe (regime=finetune, chosen by the model conf), any override wins, and the
weights come from timm's loader — here from a Hugging Face cache the test writes, offline."""

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import CONF

from dptrain import keys as key
from dptrain.errors import UserError

FINETUNE = {"model.pretrained": True, "optimizer.name": "adam", "optimizer.lr": 5e-4, "batch_size": 1000,
            "physical_batch_size": 32, "epochs": 3.0, "engine.clipping": "automatic"}
SCRATCH = {"model.pretrained": False, "optimizer.name": "sgd", "optimizer.lr": 0.1, "batch_size": 256,
           "physical_batch_size": 128, "epochs": 15.0, "engine.clipping": "abadi"}


def values(cfg, keys):
    from omegaconf import OmegaConf

    return {k: OmegaConf.select(cfg, k) for k in keys}


def test_the_headline_command_is_the_seeds_fine_tuning_recipe(compose):
    from dptrain.models.factory import data_config

    cfg = compose("model=beit", "dataset=cifar100", "eps=1")
    assert values(cfg, FINETUNE) == FINETUNE
    assert cfg.model.name == "beit_base_patch16_224.in22k_ft_in22k_in1k" and cfg.eps == 1
    # the pretrained model's input size and normalisation (timm's pretrained_cfg; no network)
    assert data_config(cfg.model.name, cfg.model.pretrained) == {"image_size": 224, "mean": (0.5,) * 3,
                                                                 "std": (0.5,) * 3}


@pytest.mark.parametrize("conf", sorted(f.removesuffix(".yaml") for f in os.listdir(os.path.join(CONF, "model"))))
def test_model_confs_that_name_timm_weights_fine_tune_the_others_train_from_scratch(compose, conf):
    extra = ["model.name=convnext_atto"] if conf == "timm" else []
    cfg = compose(f"model={conf}", *extra)
    scratch = conf in ("cnn", "scatter_cnn", "timm")  # timm.yaml names no weights: regime=finetune opts in
    assert values(cfg, FINETUNE) == (SCRATCH if scratch else FINETUNE), conf


def test_any_override_wins_over_the_regime(compose):
    cfg = compose("model=beit", "epochs=7", "optimizer=sgd", "optimizer.lr=0.01", "engine.clipping=abadi",
                  "batch_size=64", "model.pretrained=false")
    assert values(cfg, FINETUNE) == {**FINETUNE, "epochs": 7.0, "optimizer.name": "sgd", "optimizer.lr": 0.01,
                                     "engine.clipping": "abadi", "batch_size": 64, "model.pretrained": False}
    assert values(compose("model=beit", "regime=scratch"), SCRATCH) == SCRATCH
    assert compose("model=beit", "engine=opacus").engine.clipping == "abadi"  # Opacus has no automatic clipping
    assert values(compose("model=cnn", "regime=finetune"), FINETUNE) == FINETUNE
    # a paper row keeps its own choices; the efficiency rows stay from scratch
    assert values(compose("experiment=beit_cifar100_eps1"), FINETUNE) == FINETUNE
    assert not compose("experiment=vgg19_efficiency").model.pretrained


def write_cifar100(root, n=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "fine_labels": [int(i * 7 % 100) for i in range(n)], "coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)


def test_cifar100_from_its_pickle_format(tmp_path):
    from dptrain.data.datasets import create_dataset

    write_cifar100(tmp_path)
    data = create_dataset("cifar100", root=str(tmp_path), download=False, image_size=48, mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    assert (data.num_classes, data.image_size, len(data.train), len(data.test)) == (100, 48, 20, 20)
    assert data.train[3][1] == 21


def warm_cache(monkeypatch, home, tagged: str, seed=0) -> dict:
    """timm's weights for `tagged` (architecture.tag, hosted at hf-hub:timm/<tagged>) in a Hugging Face cache under
    `home`, the hub offline: the layout a first online run leaves behind. Returns the state dict written."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(tagged.split(".")[0]).state_dict().items()}
    repo = home / "hub" / f"models--timm--{tagged}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return state


def test_offline_without_the_weights_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from dptrain.models.factory import create_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        create_model("test_vit.r160_in1k", num_classes=10, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot load the pretrained weights of 'test_vit.r160_in1k' "
                                              "(hf-hub:timm/test_vit.r160_in1k; LocalEntryNotFoundError")
    for way_out in ("go online once", "HF_HOME", "model.checkpoint=<file>", "regime=scratch", "model.pretrained=false"):
        assert way_out in msg
    with pytest.raises(UserError, match="^model=cnn has no pretrained weights: train it from scratch"):
        create_model("cnn", num_classes=10, pretrained=True)
    with pytest.raises(UserError, match="^timm has no pretrained weights for 'beit3_giant_patch14_224': train it "
                                        "from scratch with regime=scratch"):
        create_model("beit3_giant_patch14_224", num_classes=10, pretrained=True, depth=1, embed_dim=32, num_heads=2)


def test_batchnorm_replaced_in_pretrained_weights_is_said(tmp_path, monkeypatch):
    from dptrain.models.factory import create_model
    from dptrain.models.finetune import weights_from

    warm_cache(monkeypatch, tmp_path, "test_resnet.r160_in1k")
    model = create_model("test_resnet.r160_in1k", num_classes=5, pretrained=True)
    assert weights_from(model, pretrained=True, checkpoint=None) == (
        f"fine-tuned from test_resnet.r160_in1k (its {model.batchnorm_replaced} BatchNorm layers replaced by freshly "
        "initialised GroupNorm: not the pretrained network any more)")
    assert model.batchnorm_replaced > 0
    assert weights_from(create_model("cnn", num_classes=5), pretrained=False, checkpoint=None) == "from scratch"


@pytest.mark.slow  # a short run at 160×160: ~10 s on a quiet machine
def test_headline_style_command_fine_tunes_the_cached_weights_with_a_new_head(compose, tmp_path, monkeypatch):
    """`dptrain model=vit_tiny dataset=cifar100 eps=1` with the model's name pointed at timm's tiny test ViT (its
    weights in the cache): the model conf's fine-tuning recipe, timm's weights loaded, a fresh 100-class head, the
    pretrained input size (160) and normalisation, one step trained, and summary.json saying where from."""
    from dptrain.cli.train import format_summary
    from dptrain.models.factory import data_config
    from dptrain.train.run import run

    state = warm_cache(monkeypatch, tmp_path / "hf", "test_vit.r160_in1k")
    write_cifar100(tmp_path / "cifar")
    cfg = compose("model=vit_tiny", "model.name=test_vit.r160_in1k", "dataset=cifar100", "eps=1",
                  f"dataset.root={tmp_path / 'cifar'}", "dataset.num_workers=0", "batch_size=8",
                  "physical_batch_size=4", "epochs=0.4", "progress=false", "checkpoint.every_s=0", "device=cpu")
    assert values(cfg, FINETUNE) == {**FINETUNE, "batch_size": 8, "physical_batch_size": 4, "epochs": 0.4}
    assert data_config(cfg.model.name, True)["image_size"] == 160
    s = run(cfg, str(tmp_path / "run"))
    assert s[key.INIT] == "fine-tuned from test_vit.r160_in1k" and s[key.STEPS] == 1
    assert s[key.TRAINABLE] == "all" and s[key.TRAINABLE_PARAMS] == sum(v.numel() for k, v in state.items()
                                                                       if not k.startswith("head.")) + 64 * 100 + 100
    assert "test_vit.r160_in1k (fine-tuned from test_vit.r160_in1k) on cifar100" in format_summary(s)
    tuned = torch.load(tmp_path / "run" / "model.pt")
    assert tuned["head.weight"].shape == (100, 64) and state["head.weight"].shape == (1000, 64)
    assert tuned["pos_embed"].shape[1] == 1 + (160 // 16) ** 2  # the pretrained input size
    # one Adam step at lr 5e-4 moves each weight by ≲ 5e-4: the body is the cached weights, trained
    body = [k for k in state if not k.startswith("head.")]
    assert max((tuned[k] - state[k]).abs().max().item() for k in body) < 2e-3
    assert max((tuned[k] - state[k]).abs().max().item() for k in body) > 0
