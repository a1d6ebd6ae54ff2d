"""The end of a backward: the identity on a model output whose backward queues the engine's callback, and the
float32 the norms and clipped sums are computed in."""

from __future__ import annotations

import contextlib

import torch


class Finish(torch.autograd.Function):
    """Identity on a model output (a copy: a custom Function's returned input may not be modified in place)
    whose backward queues the engine's end-of-backward callback on the backward it runs in."""

    @staticmethod
    def forward(ctx, out, queue):
        ctx.queue = queue
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.queue()
        return g, None


@contextlib.contextmanager
def exact_fp32():
    """Norms and clipped sums in full float32 on CUDA: TF32 (cuDNN's default for convolutions) rounds the clipped
    sum's weight-gradient convolution differently from the norm's float32 matmuls, so a clipped example could exceed
    R by ~1e-3 relative. The flags are process-wide; restored on exit."""
    if not torch.cuda.is_available():
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
