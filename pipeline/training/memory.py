"""Peak training memory of each phase at its configured micro-batch (`bench memory`).

On CUDA it is measured: two full training steps (forward, losses, discriminators, backward,
optimizer step; two, so the optimizer's state exists) on random codes, then
torch.cuda.max_memory_allocated.

On CPU it is an estimate, and labelled so: the tensors autograd saves for the backward pass are
counted (each storage once) on a probe of one segment of a few seconds, attributed to the decoder
layer that saved them and scaled to batch_size x segment_seconds, under the same precision split
as on CUDA (CPU bf16 autocast stands in); weights, gradients and AdamW's two moments are added
(the discriminators' too; their own step and the generator's adversarial pass do not overlap).
With activation checkpointing a decoder block keeps only its input, and
the largest block's activations come back during its backward. Allocator fragmentation, cuDNN
workspaces and temporaries that are not saved for backward are not counted: leave headroom.
"""
from __future__ import annotations

import copy

import torch

from ..model.codec import build_codec
from ..model.snac48 import from_codec, param_groups
from ..settings import segment_frames
from .device import set_precision
from .discriminators import Adversarial
from .losses import ReconstructionLoss

GIB = 1024 ** 3
GPU_GB = 80          # an H100's memory: the preset must fit it with 10 % headroom


def build(codec_config: dict, target_rate: int, s: dict, device):
    """Model (random weights of the real shapes), what trains, loss and discriminators for a phase."""
    model = from_codec(build_codec(codec_config, 0), target_rate, s["init"], interpolator=s["interpolator"])
    if s["lora"]["enabled"]:
        from ..model.lora import LoRAConfig, apply_lora
        apply_lora(model, LoRAConfig(**{k: v for k, v in s["lora"].items() if k != "enabled"}))
    groups, _ = param_groups(model, s["groups"], s["lr"])
    model.to(device).train()
    model.decoder.checkpointing = s["activation_checkpointing"]
    set_precision(s["precision"], torch.device(device), model.decoder)
    # the split on the CPU too: CPU bf16 autocast stands in for CUDA's in the estimate
    model.decoder.bf16_layers = model.decoder.bf16_split() if s["precision"] == "bf16" else 0
    loss_fn = ReconstructionLoss(target_rate, s["lambdas"], n_ffts=s["n_ffts"], n_mels=s["n_mels"]).to(device)
    adv = Adversarial(s["adversarial"], model.geometry).to(device) if s["adversarial"]["enabled"] else None
    return model, [p for g in groups for p in g["params"]], loss_fn, adv


def random_batch(geo, batch: int, frames: int, device):
    codes = [torch.randint(geo.codebook_size, (batch, frames // st), device=device) for st in geo.strides]
    return codes, 0.1 * torch.randn(batch, 1, frames * geo.hop_target, device=device)


def step(model, trainable, loss_fn, adv, codes, target, opt=None, mark=lambda part: None):
    """One training step as the trainer takes it (discriminators included); `mark` is told which
    part runs."""
    pred = model.decode(codes)
    loss, _ = loss_fn(pred, target)
    if adv:
        mark("discriminator step")
        adv.discriminator_step(target, pred)
        mark("generator adversarial")
        loss = loss + adv.generator_loss(target, pred)[0]
    loss.backward()
    if opt:
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure_cuda(codec_config: dict, target_rate: int, s: dict) -> dict:
    """Eager, as without torch.compile (which usually needs less). Out of memory is a result."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    how = f"measured on {torch.cuda.get_device_name()}"
    try:
        model, trainable, loss_fn, adv = build(codec_config, target_rate, s, device)
        opt = torch.optim.AdamW(trainable, lr=s["lr"])
        frames = segment_frames(s["segment_seconds"], model.geometry)
        codes, target = random_batch(model.geometry, s["batch_size"] // s["nproc_per_node"], frames, device)
        for _ in range(2):
            step(model, trainable, loss_fn, adv, codes, target, opt)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"peak_gib": float("inf"), "how": f"{how}: out of memory "
                f"({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"}
    finally:
        model = trainable = loss_fn = adv = opt = codes = target = None
        torch.cuda.empty_cache()
    return {"peak_gib": torch.cuda.max_memory_allocated() / GIB, "how": how}


def estimate_cpu(codec_config: dict, target_rate: int, s: dict, probe_seconds: float = 1.0) -> dict:
    s = copy.deepcopy(s)
    checkpointing, s["activation_checkpointing"] = s["activation_checkpointing"], False
    model, trainable, loss_fn, adv = build(codec_config, target_rate, s, "cpu")
    geo = model.geometry
    frames, probe = segment_frames(s["segment_seconds"], geo), segment_frames(probe_seconds, geo)
    scale = (s["batch_size"] // s["nproc_per_node"]) * frames / probe
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

    dec = model.decoder
    layers = {f"decoder.model.{i}": m for i, m in enumerate(dec.model)} | {"decoder.new_block": dec.new_block}
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
        step(model, trainable, loss_fn, adv, codes, target, mark=lambda part: where.__setitem__(0, part))
    for h in hooks:
        h.remove()
    blocks = [n for n, m in layers.items() if type(m).__name__ == "DecoderBlock"]
    # the discriminators' step is over (its activations freed) before the generator's adversarial
    # pass, while the decoder's graph lives through both
    d_step, g_adv = saved.pop("discriminator step", 0), saved.pop("generator adversarial", 0)
    activations = sum(saved.values()) + max(d_step, g_adv)
    if checkpointing:        # a block keeps its input; its activations return during its backward
        activations += sum(inputs[n] for n in blocks) - sum(saved.get(n, 0) for n in blocks)
        activations += max(saved.get(n, 0) for n in blocks)
    fp32 = 4
    train_params = sum(p.numel() for p in trainable) + (sum(p.numel() for p in adv.params) if adv else 0)
    state = (sum(p.numel() for p in model.parameters()) + (sum(p.numel() for p in adv.params) if adv else 0)
             + 3 * train_params) * fp32                      # weights + gradients + AdamW's two moments
    batch = scale * (target.nbytes + sum(c.nbytes for c in codes))
    return {"peak_gib": (state + batch + scale * activations) / GIB, "how": "estimate (CPU, saved tensors)",
            "state_gib": state / GIB, "activations_gib": scale * activations / GIB}


def peak_memory(codec_config: dict, target_rate: int, s: dict) -> dict:
    if torch.cuda.is_available():
        return measure_cuda(codec_config, target_rate, s)
    return estimate_cpu(codec_config, target_rate, s)


def preset(configfiles: list, one_adapter: bool = False) -> tuple:
    """A preset layered over config/config.yaml (as Snakemake does): (config with defaults, the
    codec's constructor config, where that came from, {job name: settings} for every training job
    of the chain, a LoRA adapter as lora:<name> (one_adapter: the first adapter alone)). Without the
    codec's weights here, an official SNAC model's shapes by the folder's name (random weights: the
    same speed and memory)."""
    import json
    from pathlib import Path

    from ..configdiff import load_config
    from ..model.codec import OFFICIAL_CONFIGS
    from ..settings import phase_settings, training_jobs, with_defaults
    root = Path(__file__).resolve().parents[2]
    cfg = with_defaults(load_config([root / "config" / "config.yaml", *configfiles]))
    folder = cfg["codec"]["pretrained"]
    if folder and (Path(folder) / "config.json").is_file():
        codec_cfg, source = json.loads((Path(folder) / "config.json").read_text()), folder
    elif folder:
        if Path(folder).name not in OFFICIAL_CONFIGS:
            raise SystemExit(f"error: codec.pretrained {folder} has no config.json here, and its name is not one of "
                             f"the official SNAC models ({', '.join(OFFICIAL_CONFIGS)}) whose shape the benches know")
        codec_cfg, source = OFFICIAL_CONFIGS[Path(folder).name], f"random weights shaped like {Path(folder).name}"
    else:
        codec_cfg, source = cfg["codec"]["demo"]["config"], "the demo codec's config"
    jobs = training_jobs(cfg)
    if one_adapter:             # the first adapter of each phase with adapters
        jobs = [j for j in jobs if j == next(k for k in jobs if k.phase == j.phase)]
    phases = {j.name: phase_settings(cfg, j.phase, j.adapter) for j in jobs}
    return cfg, codec_cfg, source, phases


def report(configfiles: list, other_checkpointing: bool = False, one_adapter: bool = False) -> list:
    """Peak memory per phase of a preset (layered over config/config.yaml, as Snakemake does),
    with a random-weight codec of the preset's shapes when its weights are not on this machine;
    other_checkpointing: each phase also with activation checkpointing the other way (marked
    "what if"), the figures that re-size a preset."""
    from rich.table import Table

    from ..ui import console
    cfg, codec_cfg, source, phases = preset(configfiles, one_adapter)
    how = "measured" if torch.cuda.is_available() else "estimated on the CPU from saved tensors (no GPU here)"
    t = Table(title=f"peak training memory per process, {how}: {' '.join(map(str, configfiles))} ({source})")
    for c in ("phase", "micro-batch", "grad_accum", "checkpointing", "precision", "adversarial", "peak GiB",
              f"fits {GPU_GB:g} GB - 10 %"):
        t.add_column(c)
    rows = []
    if other_checkpointing:
        phases = {k: v for name, s in phases.items() for k, v in
                  ((name, s), (f"{name} (what if)", {**s, "activation_checkpointing": not s["activation_checkpointing"]}))}
    for name, s in phases.items():
        r = peak_memory(codec_cfg, cfg["codec"]["target_rate"], s)
        rows.append({"phase": name, "micro_batch": s["batch_size"] // s["nproc_per_node"],
                     "segment_seconds": s["segment_seconds"], "grad_accum": s["grad_accum"],
                     "checkpointing": s["activation_checkpointing"], "precision": s["precision"],
                     "adversarial": s["adversarial"]["enabled"], **r,
                     "fits": r["peak_gib"] * GIB <= 0.9 * GPU_GB * 1e9})
        t.add_row(name, f"{s['batch_size'] // s['nproc_per_node']} x {s['segment_seconds']} s", str(s["grad_accum"]),
                  str(s["activation_checkpointing"]), s["precision"], str(s["adversarial"]["enabled"]),
                  f"{r['peak_gib']:.1f}", "yes" if r["peak_gib"] * GIB <= 0.9 * GPU_GB * 1e9 else "[red]no")
    console.print(t, width=max(console.width, 130))
    return rows
