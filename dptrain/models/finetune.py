"""Fine-tuning: what trains (model.trainable), the new head (model.head_init), LoRA adapters (peft), and the line that
says where a run's weights came from. Everything here happens before the privacy engine attaches: the engine then
covers exactly the parameters left trainable (and refuses any that no call uses)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from dptrain.errors import UserError, check_name

log = logging.getLogger("dptrain.finetune")

# model.trainable → what it trains; the literature's ways of fine-tuning under DP
TRAINABLE = {
    "all": "every parameter (full fine-tuning)",
    "head": "the classifier head only (linear probe)",
    "bias": "every bias and the head (DP-BiTFiT, Bu et al. 2022)",
    "lora": "low-rank adapters (model.lora) and the head (LoRA, Hu et al. 2021)",
}
HEAD_INIT = ("default", "zero")


def classifier(model: nn.Module) -> nn.Module:
    """The classifier head: timm's get_classifier() (ResNet's fc, ViT's head, ...), or the small CNNs' `head`."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise UserError(f"cannot find the classifier head of {type(model).__name__} (no get_classifier() or .head "
                        "with parameters): use model.trainable=all")
    return head


def zero_head(model: nn.Module) -> None:
    """model.head_init=zero: the head's last Linear starts at zero (weights and bias), the usual start of a
    private fine-tune (De et al. 2022): the first steps' noise then lands on a classifier that says nothing yet."""
    linears = [m for m in classifier(model).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("model.head_init=zero: the classifier head has no Linear layer; use model.head_init=default")
    with torch.no_grad():
        linears[-1].weight.zero_()
        if linears[-1].bias is not None:
            linears[-1].bias.zero_()


def set_trainable(model: nn.Module, trainable: str, lora=None) -> nn.Module:
    """Freeze all but model.trainable's subset (lora: after adding the adapters); returns the model (the same one)."""
    check_name("model.trainable", trainable, TRAINABLE)
    if trainable == "all":
        return model
    head = {id(p) for p in classifier(model).parameters()}
    if trainable == "lora":
        model = add_lora(model, lora)
    for name, p in model.named_parameters():
        keep = (id(p) in head or (trainable == "bias" and name.rsplit(".", 1)[-1].endswith("bias"))
                or (trainable == "lora" and ".lora_" in name))
        p.requires_grad_(keep)
    return model


def add_lora(model: nn.Module, lora) -> nn.Module:
    """peft's LoRA layers injected in place (no PeftModel wrapper: the module tree stays timm's). Each adapter is
    two plain nn.Linear (nn.Conv2d for convs) — lora_A then lora_B, scaled by alpha/rank — which the engine's linear
    and conv rules clip exactly; the base layer is frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("model.trainable=lora needs peft: pip install 'dptrain[lora]' (or pip install peft)") from None
    targets = list(lora.targets)
    config = LoraConfig(r=int(lora.rank), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                        target_modules=targets, bias="none")
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear,
                                                                                                nn.Conv2d))})
        raise UserError(f"model.lora.targets={targets} matched no layer peft can adapt ({str(e).splitlines()[0]}); "
                        f"this model's Linear/Conv2d names: {', '.join(names[:12])}") from None
    return model


def check_adapters_run(model: nn.Module, x: torch.Tensor) -> None:
    """Every LoRA adapter must take part in the forward: a module that uses its layer's weight itself (timm's BEiT
    attention: F.linear(x, self.qkv.weight, ...)) skips the adapter, whose parameters would get no gradient (the
    engine refuses them at the first backward; this says why, before the data loads)."""
    called, hooks = set(), []
    for name, m in model.named_modules():
        if name.endswith(".lora_A") and isinstance(m, nn.ModuleDict):
            hooks += [a.register_forward_hook(lambda *_, n=name: called.add(n)) for a in m.values()]
    if not hooks:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    unused = [n.removesuffix(".lora_A") for n, m in model.named_modules() if n.endswith(".lora_A") and n not in called]
    if unused:
        raise UserError(f"model.lora.targets: the adapter on '{unused[0]}' never runs ({len(unused)} such): its parent "
                        "module uses the layer's weight itself (timm's BEiT attention calls F.linear(x, qkv.weight)); "
                        "drop it from model.lora.targets (default: attn.proj, mlp.fc1, mlp.fc2)")


def merge_lora(model: nn.Module) -> nn.Module:
    """The adapters merged into their base layers, and each peft layer replaced by its base layer: model.pt is then
    the plain architecture, loadable with model.checkpoint= whatever model.trainable the next run uses."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "merge") and hasattr(child, "get_base_layer") and hasattr(child, "lora_A"):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model


def count_trainable(model: nn.Module) -> int:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise UserError("model.trainable leaves no trainable parameter")
    return n


def weights_from(model: nn.Module, *, pretrained: bool, checkpoint: str | None) -> str:
    """summary.json's model/init and the final line's: "fine-tuned from <timm weights tag>", "fine-tuned from
    checkpoint <file>" or "from scratch". BatchNorm replaced by GroupNorm (models.fix_batchnorm) is said: those
    layers start afresh, so the network is no longer the pretrained one."""
    if checkpoint:
        src = f"fine-tuned from checkpoint {checkpoint}"
    elif pretrained:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        tag = ".".join(t for t in (cfg.get("architecture"), cfg.get("tag")) if t) or cfg.get("hf_hub_id") or "?"
        src = f"fine-tuned from {tag}"
    else:
        return "from scratch"
    n = getattr(model, "batchnorm_replaced", 0)
    if n:
        src += (f" (its {n} BatchNorm layers replaced by freshly initialised GroupNorm: not the pretrained network "
                "any more)")
    return src


def prepare(model: nn.Module, m) -> nn.Module:
    """model.head_init and model.trainable (m: the ModelConfig) applied to a freshly created model; logs the count."""
    check_name("model.head_init", m.head_init, HEAD_INIT)
    if m.head_init == "zero":
        zero_head(model)
    model = set_trainable(model, m.trainable, m.lora)
    n, total = count_trainable(model), sum(p.numel() for p in model.parameters())
    log.info("model.trainable=%s: %d of %d parameters train (%s)", m.trainable, n, total, TRAINABLE[m.trainable])
    return model
