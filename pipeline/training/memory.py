"""Peak training memory of each phase at its configured micro-batch (`bench memory`).

On CUDA it is measured: two full training steps (forward, losses, discriminators, backward,
optimizer step; two, so the optimizer's state exists) on random codes, then
torch.cuda.max_memory_allocated.

On CPU it is an estimate, and labelled so: the tensors autograd saves for the backward pass are
counted (each storage once) on a probe of one segment of a few seconds, attributed to the decoder
layer that saved them and scaled to batch_size x segment_seconds, under the same precision split
as on CUDA (CPU bf16 autocast stands in); weights, gradients and AdamW's two moments are added
(the discriminators' too; their own step and the generator's adversarial pass do not overlap,
and their activations scale with what they see: the segment or its crop_seconds window).
With activation checkpointing a decoder block keeps only its input, and
the largest block's activations come back during its backward. Allocator fragmentation, cuDNN
workspaces and temporaries that are not saved for backward are not counted: leave headroom.
"""
from __future__ import annotations

import copy

import torch

from ..model import codecs
from ..settings import segment_frames
from .device import set_precision
from .discriminators import Adversarial
from .groups import lora_config, param_groups
from .losses import ReconstructionLoss
from .stages import DecoderRun, bf16_split

GIB = 1024 ** 3


def build(codec_config: dict, target_rate: int, s: dict, device, n_q: int | None = None):
    """Model (random weights of the real shapes), what trains, the decoder path as the trainer runs
    it, loss and discriminators for a phase."""
    model = codecs.from_codec(codecs.build(codec_config, 0, n_q), target_rate, s["init"],
                              interpolator=s["interpolator"])
    if s["lora"]["enabled"]:
        from ..model.lora import apply_lora
        apply_lora(model, lora_config(s))
    groups, _ = param_groups(model, s["groups"], s["lr"])
    model.to(device).train()
    set_precision(s["precision"], torch.device(device))            # the TF32 flags
    # the split on the CPU too: CPU bf16 autocast stands in for CUDA's in the estimate
    run = DecoderRun(model, bf16_split(model) if s["precision"] == "bf16" else 0, s["activation_checkpointing"])
    loss_fn = ReconstructionLoss(target_rate, s["lambdas"], n_ffts=s["n_ffts"], n_mels=s["n_mels"]).to(device)
    adv = Adversarial(s["adversarial"], model.geometry).to(device) if s["adversarial"]["enabled"] else None
    return model, [p for g in groups for p in g["params"]], run, loss_fn, adv


def random_batch(geo, batch: int, frames: int, device):
    codes = [torch.randint(geo.codebook_size, (batch, frames // st), device=device) for st in geo.strides]
    return codes, 0.1 * torch.randn(batch, 1, frames * geo.hop_target, device=device)


def step(model, run, loss_fn, adv, codes, target, opt=None, mark=lambda part: None):
    """One training step as the trainer takes it (discriminators included); `mark` is told which
    part runs."""
    pred = run(model.latents(codes))
    loss, _ = loss_fn(pred, target)
    if adv:
        seen = adv.crop(target, pred)
        mark("discriminator step")
        adv.discriminator_step(*seen)
        mark("generator adversarial")
        loss = loss + adv.generator_loss(*seen)[0]
    loss.backward()
    if opt:
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_cuda(codec_config: dict, target_rate: int, s: dict, n_q: int | None = None) -> dict:
    """Eager, as without torch.compile (which usually needs less). Out of memory is a result."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    how = f"measured on {torch.cuda.get_device_name()}"
    try:
        model, trainable, run, loss_fn, adv = build(codec_config, target_rate, s, device, n_q)
        opt = torch.optim.AdamW(trainable, lr=s["lr"])
        frames = segment_frames(s["segment_seconds"], model.geometry)
        codes, target = random_batch(model.geometry, s["batch_size"] // s["nproc_per_node"], frames, device)
        for _ in range(2):
            step(model, run, loss_fn, adv, codes, target, opt)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"peak_gib": float("inf"), "how": f"{how}: out of memory "
                f"({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"}
    finally:
        model = trainable = run = loss_fn = adv = opt = codes = target = None
        torch.cuda.empty_cache()
    return {"peak_gib": torch.cuda.max_memory_allocated() / GIB, "how": how}


def estimate_cpu(codec_config: dict, target_rate: int, s: dict, probe_seconds: float = 1.0,
                 n_q: int | None = None) -> dict:
    s = copy.deepcopy(s)
    checkpointing, s["activation_checkpointing"] = s["activation_checkpointing"], False
    crop, s["adversarial"]["crop_seconds"] = s["adversarial"]["crop_seconds"], None    # the probe: whole
    model, trainable, run, loss_fn, adv = build(codec_config, target_rate, s, "cpu", n_q)
    geo = model.geometry
    frames, probe = segment_frames(s["segment_seconds"], geo), segment_frames(probe_seconds, geo)
    scale = (s["batch_size"] // s["nproc_per_node"]) * frames / probe
    seen = frames if crop is None else min(frames, crop * geo.target_rate / geo.hop_target)
    d_scale = scale * seen / frames                  # the discriminators see crop_seconds of each segment
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    if adv:
        params |= {p.untyped_storage().data_ptr() for p in adv.params}
    saved, inputs, seen, where = {}, {}, set(), ["losses"]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[where[0]] = saved.get(where[0], 0) + t.untyped_storage().nbytes()
        return t

    layers = dict(zip(run.names, run.body))        # the modules the step runs (and hooks see)
    def enter(name):
        def hook(module, x):
            where[0], inputs[name] = name, x[0].nbytes
        return hook

    def leave(*_):
        where[0] = "losses"
    hooks = [h for name, m in layers.items()
             for h in (m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave))]
    codes, target = random_batch(geo, 1, probe, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, run, loss_fn, adv, codes, target, mark=lambda part: where.__setitem__(0, part))
    for h in hooks:
        h.remove()
    blocks = [n for n, block in zip(run.names, run.blocks) if block]
    # the discriminators' step is over (its activations freed) before the generator's adversarial
    # pass, while the decoder's graph lives through both
    d_step, g_adv = saved.pop("discriminator step", 0), saved.pop("generator adversarial", 0)
    activations, d_activations = sum(saved.values()), max(d_step, g_adv)
    if checkpointing:        # a block keeps its input; its activations return during its backward
        activations += sum(inputs[n] for n in blocks) - sum(saved.get(n, 0) for n in blocks)
        activations += max(saved.get(n, 0) for n in blocks)
    fp32 = 4
    train_params = sum(p.numel() for p in trainable) + (sum(p.numel() for p in adv.params) if adv else 0)
    state = (sum(p.numel() for p in model.parameters()) + (sum(p.numel() for p in adv.params) if adv else 0)
             + 3 * train_params) * fp32                      # weights + gradients + AdamW's two moments
    batch = scale * (target.nbytes + sum(c.nbytes for c in codes))
    activations = scale * activations + d_scale * d_activations
    return {"peak_gib": (state + batch + activations) / GIB, "how": "estimate (CPU, saved tensors)",
            "state_gib": state / GIB, "activations_gib": activations / GIB}


def peak_memory(codec_config: dict, target_rate: int, s: dict, n_q: int | None = None) -> dict:
    if torch.cuda.is_available():
        return measure_cuda(codec_config, target_rate, s, n_q)
    return estimate_cpu(codec_config, target_rate, s, n_q=n_q)
