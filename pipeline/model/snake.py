"""Snake, x + sin^2(alpha x) / alpha per channel, in plain tensor operations.

SNAC's Snake1d calls a `@torch.jit.script` function. On CUDA, TorchScript's profiling executor
re-specialises (and fuses) that function after its first runs, so activation checkpointing's
recomputation in the backward pass saves its tensors in another order than the forward did, and
torch.utils.checkpoint stops at the first backward ("Recomputed values ... have different
metadata"). On CPU the same happens at the first checkpointed backward of a process, and again
whenever the input's requires_grad changes. The same arithmetic without TorchScript has none of
this, and torch.compile can fuse it with its neighbours (it cannot see into a ScriptFunction).

`use_snake(model, old)` swaps every `old` module (a codec family's own Snake class) for this one,
keeping its `alpha` Parameter: state-dict keys (`...alpha`) and weights stay as they were.
"""
from __future__ import annotations

import torch
from torch import nn


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The operations of SNAC's (and DAC's) snake, in the same order: the same numbers."""
    shape = x.shape
    x = x.reshape(shape[0], shape[1], -1)
    x = x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
    return x.reshape(shape)


class Snake1d(nn.Module):
    def __init__(self, channels: int, alpha: nn.Parameter | None = None):
        super().__init__()
        self.alpha = alpha if alpha is not None else nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return snake(x, self.alpha)

    def extra_repr(self) -> str:
        return f"{self.alpha.shape[1]}"


def use_snake(model: nn.Module, old: type) -> nn.Module:
    """Replace every `old` submodule of `model` by Snake1d sharing its alpha; -> model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                setattr(parent, name, Snake1d(child.alpha.shape[1], child.alpha))
    return model


def script_calls(module: nn.Module) -> list:
    """TorchScript functions and modules that `module`'s own forward calls by a global name (a
    recursive look at the code objects of its forward and their nested functions), and
    `module` itself when it is a ScriptModule. Activation checkpointing must see none."""
    found = []
    if isinstance(module, torch.jit.ScriptModule):
        found.append(type(module).__name__)
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    stack = [code] if code else []
    while stack:
        c = stack.pop()
        for name in c.co_names:
            obj = forward.__globals__.get(name)
            if isinstance(obj, (torch.jit.ScriptFunction, torch.jit.ScriptModule)):
                found.append(f"{type(module).__name__}.forward -> {name}")
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return found
