"""Fine-tuning: model.trainable's subsets are exact against the float64
one-example-at-a-time reference; a dptrain model.pt fine-tunes with a new head; adapters that never run are refused."""

import pytest
import torch
from helpers.engine_cases import batches

from dptrain.config import LoraConfig
from dptrain.errors import UserError
from dptrain.models.finetune import TRAINABLE, check_adapters_run, classifier, merge_lora, set_trainable, zero_head
from dptrain.testing import check, tiny_beit, tiny_resnet, tiny_vit

MODELS = {  # name → (make, input shape, LoRA targets)
    "vit_tiny": (tiny_vit, (3, 8, 8), ["attn.proj", "mlp.fc1", "mlp.fc2"]),
    "beit_tiny": (tiny_beit, (3, 8, 8), ["attn.proj", "mlp.fc1", "mlp.fc2"]),
    "resnet18_gn": (tiny_resnet, (3, 16, 16), ["conv1", "conv2"]),
}


def subset(name: str, trainable: str):
    torch.manual_seed(0)
    make, shape, targets = MODELS[name]
    model = set_trainable(make(), trainable, LoraConfig(rank=2, alpha=4.0, targets=targets))
    with torch.no_grad():  # peft starts lora_B at zero, which makes lora_A's gradient zero: nothing to compare
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model, shape


def expected(model, trainable: str) -> set[str]:
    head = {id(p) for p in classifier(model).parameters()}
    rule = {"all": lambda n: True, "head": lambda n: False, "bias": lambda n: n.split(".")[-1].endswith("bias"),
            "lora": lambda n: ".lora_" in n}[trainable]
    return {n for n, p in model.named_parameters() if id(p) in head or rule(n)}


def run_check(name, trainable, mode, passes):
    model, shape = subset(name, trainable)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == expected(model, trainable) and trains
    if trainable == "bias" and name == "beit_tiny":  # BEiT's q/v biases are biases (its qkv weight frozen)
        assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= trains
    err, engine = check(model, batches(shape, sizes=(2, 3)), mode=mode, max_grad_norm=0.3, passes=passes)
    assert err < 1e-10
    return engine


@pytest.mark.parametrize("trainable", sorted(TRAINABLE))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_subsets_match_reference(name, trainable):
    run_check(name, trainable, "mixed_ghost", 1)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "passes"), [("ghost", 1), ("per_sample", 1), ("mixed_ghost", 2)])
@pytest.mark.parametrize("trainable", ["head", "bias", "lora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_subsets_match_reference_in_every_mode(name, trainable, mode, passes):
    run_check(name, trainable, mode, passes)


def test_lora_adapters_are_plain_linear_layers_on_the_fast_rules():
    model, shape = subset("vit_tiny", "lora")
    engine = run_check("vit_tiny", "lora", "mixed_ghost", 1)
    assert engine.fallback_share == 0.0
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora and all(type(m) is torch.nn.Linear for m in lora)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_lora_on_beits_functional_qkv_is_refused_in_one_line():
    """timm's BEiT attention calls F.linear(x, self.qkv.weight, ...): an adapter on qkv would never run."""
    model = set_trainable(tiny_beit(), "lora", LoraConfig(rank=2, targets=["qkv", "mlp.fc1"]))
    with pytest.raises(UserError, match=r"^model.lora.targets: the adapter on 'blocks.0.attn.qkv' never runs \(2 "
                                        r"such\).*F.linear\(x, qkv.weight\)") as e:
        check_adapters_run(model, torch.randn(1, 3, 8, 8))
    assert "\n" not in str(e.value)
    check_adapters_run(set_trainable(tiny_vit(), "lora", LoraConfig(rank=2, targets=["qkv"])), torch.randn(1, 3, 8, 8))


def test_lora_targets_that_match_nothing_are_one_line():
    with pytest.raises(UserError, match=r"model.lora.targets=\['nothing'\] matched no layer.*: .*conv1") as e:
        set_trainable(tiny_resnet(), "lora", LoraConfig(targets=["nothing"]))
    assert "\n" not in str(e.value)


def test_unknown_subset_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown model.trainable 'biases'; valid: all, head, bias, lora"):
        set_trainable(tiny_vit(), "biases")


def test_merged_lora_is_the_plain_architecture_computing_the_same():
    model, shape = subset("vit_tiny", "lora")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        after = merged(x)
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["opacus", "mixed_ghost", "nonprivate"])
@pytest.mark.parametrize("trainable", ["head", "bias", "lora"])
def test_every_engine_steps_the_subset_and_nothing_else(engine, trainable):
    """Through the runner's engines (Opacus wraps leaf layers: peft's layer still reads its adapters' weights)."""
    from dptrain.engines import create_engine
    from dptrain.privacy.streams import Streams

    model, shape = subset("vit_tiny", trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    eng = create_engine(engine, model, opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                        streams=Streams(0))
    x, y = batches(shape, sizes=(4,))[0]
    eng.backward(eng.model(x), y, last=True)
    eng.step()
    after = dict(eng.detach().named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == trains


def test_zero_head():
    model = tiny_vit()
    zero_head(model)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0


TINY = ("progress=false", "checkpoint.every_s=0", "device=cpu", "dataset=fake", "dataset.size=24", "batch_size=12",
        "physical_batch_size=6", "epochs=1", "dataset.image_size=32", "model=timm", "model.name=test_vit")


@pytest.mark.slow  # two short runs: ~10 s on a quiet machine
def test_a_dptrain_model_pt_fine_tunes_on_other_classes_with_a_new_head(compose, tmp_path):
    """Run 1 (10 classes, LoRA) saves model.pt with its adapters merged; run 2 loads it with 3 classes: a fresh head
    (the only shape that differs), the body exactly as saved and frozen (model.trainable=head)."""
    from dptrain import keys as key
    from dptrain.train.run import run

    first = run(compose(*TINY, "model.trainable=lora", "model.lora.targets=[attn.proj]"), str(tmp_path / "a"))
    assert first[key.TRAINABLE] == "lora" and first[key.INIT] == "from scratch"
    saved = torch.load(tmp_path / "a" / "model.pt")
    assert saved["head.weight"].shape == (10, 64) and not any("lora" in k for k in saved)
    second = run(compose(*TINY, "dataset.num_classes=3", "model.trainable=head", "model.head_init=zero",
                         f"model.checkpoint={tmp_path / 'a' / 'model.pt'}"), str(tmp_path / "b"))
    assert second[key.INIT] == f"fine-tuned from checkpoint {tmp_path / 'a' / 'model.pt'}"
    assert second[key.TRAINABLE_PARAMS] == 64 * 3 + 3
    tuned = torch.load(tmp_path / "b" / "model.pt")
    assert tuned["head.weight"].shape == (3, 64) and tuned["head.weight"].abs().sum() > 0  # trained from zero
    assert all(torch.equal(tuned[k], v) for k, v in saved.items() if not k.startswith("head."))
