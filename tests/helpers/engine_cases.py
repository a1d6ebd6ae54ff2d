"""The engine's test cases shared by the exactness tests, the GPU tests and the result generators: layers and tiny
models with their input shapes, and random batches."""

import timm
import torch
import torch.nn as nn

from dptrain.testing import tiny_beit, tiny_resnet, tiny_vgg, tiny_vit

MODES = ["mixed_ghost", "ghost", "per_sample"]


def batches(shape, classes=3, sizes=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for b in sizes]


class Head(nn.Module):
    """Wraps a feature layer with a pooling classifier so every layer type ends in logits."""

    def __init__(self, body, feat, classes=3, pool="mean"):
        super().__init__()
        self.body, self.fc, self.pool = body, nn.Linear(feat, classes), pool

    def forward(self, x):
        h = self.body(x)
        h = h.flatten(2).mean(-1) if h.dim() > 2 else h
        return self.fc(torch.tanh(h))


def seq_model(layer, feat):
    return Head(layer, feat)


LAYERS = {
    "linear2d": (lambda: nn.Linear(6, 4), (6,), 4),
    "linear3d": (lambda: nn.Sequential(nn.Linear(6, 4), nn.Flatten(1, -1)), (5, 6), None),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 11), 4),
    "conv2d_stride_dil": (lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2), (3, 9, 9), 4),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 7, 7), 6),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, bias=False), (4, 7, 7), 4),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6, 6), 4),
    "conv2d_replicate": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate"), (3, 6, 6), 4),
    "conv2d_circular": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 6, 6), 4),
    "conv2d_same_even": (lambda: nn.Conv2d(3, 4, 4, padding="same"), (3, 7, 7), 4),
    "conv2d_valid": (lambda: nn.Conv2d(3, 4, 3, padding="valid"), (3, 7, 7), 4),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1)), (2, 5, 6, 5), 3),
    "conv3d_grouped": (lambda: nn.Conv3d(4, 4, 2, groups=2, padding="same"), (4, 4, 4, 4), 4),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)), (4, 6), None),
    "layernorm2d_timm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), timm.layers.LayerNorm2d(4)), (3, 5, 5), 4),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), (3, 6, 6), 4),
}


class Mean1(nn.Module):
    def forward(self, x):
        return x.mean(1)


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


class Reuse(nn.Module):
    """One Linear called twice and a conv called on two resolutions in one forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.conv(self.conv(x)).mean((2, 3)) + self.conv(x[..., ::2, ::2]).mean((2, 3))
        return self.fc(torch.tanh(self.fc(h)))


class Custom(nn.Module):
    """A module with its own parameters and no rule → the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x, *, shift=None):
        return self.inner(x * self.scale) + (0 if shift is None else shift)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(5, 4)
        self.custom = Custom()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.custom(torch.relu(self.pre(x)), shift=1.0))


MODELS = {
    "resnet18_gn": (tiny_resnet, (3, 16, 16)),
    "vit_tiny": (tiny_vit, (3, 8, 8)),
    "vgg_gn": (tiny_vgg, (3, 16, 16)),
    "beit_tiny": (tiny_beit, (3, 8, 8)),
}


class Noisy(nn.Module):
    """Dropout between hooked layers: the recomputed forward must draw the same mask."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))
