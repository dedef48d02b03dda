"""The decoder path as the trainer runs it: the model's stages (pipeline/model/codecs/base.py:
`model.stages()`), each under the precision and activation checkpointing the trainer chose.

Precision: with `bf16` on CUDA the leading stages whose output runs below codec_rate / BF16_BELOW
run under bf16 autocast (`bf16_split`), everything after them in fp32, so the new block, the head
and the losses keep the new band's precision (DESIGN, invariant 8). The error bf16 adds grows
with the rate a stage runs at: measured on the test codec (hop 512), bf16 up to the first SNAC
block keeps the 48 kHz output at 51 dB SNR against fp32 (50 dB in 12-24 kHz), up to the second
43 dB, over the whole pretrained decoder 28 dB (tests/test_trainer_runs.py).

Activation checkpointing: each upsampling block (a stage marked `block`: most activations live
there) keeps only its input and recomputes the rest in the backward pass.

The model itself knows nothing of either: `model.decode` (validation, evaluation, inference)
always computes in fp32 without recomputation.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BF16_BELOW = 8


def bf16_split(model) -> int:
    """How many leading stages may run in bf16: those whose output rate is below codec_rate /
    BF16_BELOW (the input convolutions and attention, the first upsampling blocks)."""
    n, limit = 0, model.geometry.codec_rate / BF16_BELOW
    for stage in model.stages():
        if stage.rate >= limit:
            break
        n += 1
    return n


class DecoderRun(nn.Module):
    """latents -> target-rate audio through `model.stages()`: the first `bf16` stages under bf16
    autocast, the blocks checkpointed when `checkpointing` (and gradients are on). Its modules are
    the model's own (registered here too, so DistributedDataParallel and torch.compile see every
    parameter of the decoder path). Build it after LoRA wraps the model's layers."""

    def __init__(self, model, bf16: int = 0, checkpointing: bool = False):
        super().__init__()
        stages = model.stages()
        self.names = [s.name for s in stages]
        self.body = nn.ModuleList(s.module for s in stages)
        self.blocks = [s.block for s in stages]
        self.bf16, self.checkpointing = int(bf16), bool(checkpointing)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16 > 0):
            for i in range(self.bf16):
                x = self._run(i, x)
        x = x.float()
        for i in range(self.bf16, len(self.body)):
            x = self._run(i, x)
        return x

    def _run(self, i: int, x):
        if self.checkpointing and self.blocks[i] and torch.is_grad_enabled():
            return checkpoint(self.body[i], x, use_reentrant=False)
        return self.body[i](x)
