"""The trainer: one phase of the 48 kHz decoder, resumable, read top to bottom.

  settings  -> model (from the codec with smart/random init, or the previous phase's output)
            -> preflight checklist (parameter groups, cache fingerprint, rates, data after filters)
            -> AdamW param groups + warmup/cosine schedule
            -> resume from the newest step checkpoint of the same run, if any
            -> steps: batch k = f(seed, k); loss; skip non-finite; clip; step; log; validate; checkpoint
            -> phase outputs: model.safetensors + config.json (+ lora_weights.safetensors)

A "run" is identified by a digest of the settings, the starting weights and the cache
fingerprint. Step checkpoints of another run (changed settings or inputs) are never resumed:
they are removed with a warning, and the phase starts from step 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..data.cache import CACHE_FORMAT, CacheError, Shard, dump_json
from ..model.codec import fingerprint, load_codec, pick_device, state_digest
from ..data.segments import SegmentBatches, build_pool, collate, fixed_segments, open_training_cache, segment_frames
from .losses import ReconstructionLoss
from ..model.snac48 import FROZEN_FOREVER, from_codec, load_model, matches, param_groups, save_model
from ..settings import check_phase
from ..ui import console, progress
from rich.progress import TextColumn


def train(phase, s, codec_dir, cache_paths, heldout_paths, init_dir, out_dir, resume_from=None,
          adapter="default") -> dict:
    """resume_from: a step checkpoint of this same run to resume exactly (default: the newest);
    adapter: the LoRA adapter's name when the phase trains LoRA."""
    check_phase(s, phase)
    out = Path(out_dir)
    ckdir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(s["device"])
    torch.manual_seed(s["seed"])

    # ---- data: the cache must have been built by this codec -----------------------------------
    pf = Preflight(out / "preflight.json", phase)
    codec = load_codec(codec_dir)
    target_rate = Shard(cache_paths[0]).fingerprint["target_rate"]
    fp = fingerprint(codec, target_rate, CACHE_FORMAT)
    pf.add("codec weights loaded", True, f"{codec_dir} (sha256 {fp['codec_digest'][:12]})")
    try:
        shards = open_training_cache(cache_paths, fp, s["preload"])
        heldout = open_training_cache(heldout_paths, fp, s["preload"])
        pf.add("cache fingerprint = codec's", True, f"{len(shards)} + {len(heldout)} held-out shards, "
               f"hop {fp['hop']}, strides {fp['strides']}, format {fp['cache_format']}")
    except CacheError as e:
        pf.add("cache fingerprint = codec's", False, str(e))
        pf.finish()
    n_frames = segment_frames(s["segment_seconds"], shards[0].geometry)
    pool = build_pool(shards, n_frames, s["dataset_ids"], s["allow_bandlimited"])
    pf.add("utterances after filters", len(pool.items) > 0,
           f"{len(pool.items)} (excluded: {pool.excluded or 'none'}); segments of {n_frames} frames = "
           f"{n_frames * fp['hop_target'] / target_rate:.2f} s")
    if s["source_weights"]:
        per = [sum(it[3] == k for it in pool.items) for k in range(len(s["source_weights"]))]
        pf.add("manifest sampling weights", all(per), ", ".join(
            f"manifest {k}: weight {w:g}, {n} utterances" for k, (w, n) in enumerate(zip(s["source_weights"], per))))
    val = fixed_segments(heldout, n_frames, s["val_batches"] * s["batch_size"])
    pf.add("validation segments", len(val) > 0, f"{len(val)} from the held-out cache")
    pf.add("schedule", s["warmup_steps"] <= s["steps"] and s["lr"] > 0,
           f"lr {s['lr']:g}, warmup {s['warmup_steps']} of {s['steps']} steps, cosine to x{s['lr_min_ratio']}, "
           f"batch {s['batch_size']} x accum {s['grad_accum']}")

    # ---- model and what trains --------------------------------------------------------------
    if init_dir:
        model = load_model(init_dir)
        same = all(state_digest(part.state_dict()) == state_digest(ref.state_dict())
                   for part, ref in ((model.encoder, codec.encoder), (model.quantizer, codec.quantizer)))
        pf.add("start weights", same, f"{init_dir}" if same else
               f"{init_dir}: its encoder/quantizer differ from the codec's; the codes would not mean the same thing")
        start_weights = json.loads((Path(init_dir) / "config.json").read_text())["weights_digest"]
    else:
        model = from_codec(codec, target_rate, s["init"], s["seed"])
        start_weights = f"{fp['codec_digest']}:{s['init']}"
        pf.add("start weights", True, f"codec + new block, {s['init']} init")
    if s["init_checkpoint"]:
        start_weights = warm_start(model, s["init_checkpoint"], s["groups"], pf)
    pf.add("sample rates", model.target_rate == target_rate and model.geometry.codec_rate == fp["codec_rate"],
           f"codes at {fp['codec_rate']} Hz -> model and targets at {target_rate} Hz")
    lora_cfg = None
    if s["lora"]["enabled"]:
        from ..model.lora import LoRAConfig, apply_lora
        base_digest = model.base_digest()
        lora_cfg = LoRAConfig(**{k: v for k, v in s["lora"].items() if k != "enabled"})
        wrapped = apply_lora(model, lora_cfg, adapter)
        pf.add("LoRA adapters", bool(wrapped), f"{adapter!r}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha} on {len(wrapped)} modules")
    try:
        groups, counts = param_groups(model, s["groups"], s["lr"])
        pf.add("trainable parameters", sum(c["trainable"] for c in counts) > 0,
               "; ".join(f"{c['pattern']}: {c['params']:,}" + (f" x{c['lr_factor']:g} lr" if c["trainable"] else " frozen")
                         for c in counts))
    except ValueError as e:
        pf.add("trainable parameters", False, str(e))
        pf.finish()
    model.to(device)
    pf.add("device / precision", True, f"{device}, {'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    pf.finish()
    trainable = [p for g in groups for p in g["params"]]

    opt = torch.optim.AdamW(groups, lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s))
    loss_fn = ReconstructionLoss(target_rate, s["lambdas"], n_ffts=s["n_ffts"], n_mels=s["n_mels"]).to(device)
    batches = SegmentBatches(shards, pool, n_frames, s["batch_size"], s["seed"], s["steps"] * s["grad_accum"],
                             s["source_weights"])
    run = hashlib.sha256(json.dumps([s, start_weights, fp], sort_keys=True).encode()).hexdigest()[:16]

    # ---- resume --------------------------------------------------------------------------------
    state = {"run": run, "phase": phase, "step": 0, "best": [], "nonfinite_total": 0, "nonfinite_run": 0}
    ck = latest_checkpoint(ckdir, run) if s["resume"] else None
    if resume_from:
        ck = Path(resume_from)
        other = json.loads((ck / "trainer_state.json").read_text())["run"]
        if other != run:
            raise RuntimeError(f"{ck} belongs to run {other}, not this one ({run}): settings or inputs "
                               "differ, so an exact resume is impossible; use init_checkpoint (warm restart)")
    if ck is not None:
        state = load_checkpoint(ck, model, opt, sched)
        console.print(f"[bold green]resuming[/] {phase} from {ck} (step {state['step']} of {s['steps']})")
    metrics_path = out / "metrics.jsonl"
    truncate_metrics(metrics_path, state["step"])
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(out / "tensorboard", purge_step=state["step"] or None)

    # ---- steps ---------------------------------------------------------------------------------
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(state["step"] * s["grad_accum"], len(batches))),
        batch_size=None, num_workers=s["num_workers"], persistent_workers=False,
        prefetch_factor=4 if s["num_workers"] else None,
        generator=torch.Generator().manual_seed(s["seed"]))   # not the global RNG: resume restores that
    it = iter(loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    t_start, seg_done = time.time(), 0
    with progress(TextColumn("{task.fields[info]}")) as bar:
        task = bar.add_task(phase, total=s["steps"], completed=state["step"], info="")
        for step in range(state["step"] + 1, s["steps"] + 1):
            opt.zero_grad(set_to_none=True)
            terms_sum, ok = {}, True
            for _ in range(s["grad_accum"]):
                codes, target = next(it)
                codes, target = [c.to(device) for c in codes], target.to(device)
                with autocast:
                    pred = model.decode(codes)
                loss, terms = loss_fn(pred.float(), target)
                if not torch.isfinite(loss):
                    ok = False
                    break
                (loss / s["grad_accum"]).backward()
                for k, v in {"loss": loss.detach(), **terms}.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / s["grad_accum"]
                seg_done += target.shape[0]
            if ok:
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, s["grad_clip"] or float("inf"))
                opt.step()
                state["nonfinite_run"] = 0
            else:
                state["nonfinite_run"] += 1
                state["nonfinite_total"] += 1
                console.print(f"[yellow]step {step}: non-finite loss, step skipped "
                              f"({state['nonfinite_run']} in a row, {state['nonfinite_total']} in all)")
                if state["nonfinite_run"] >= s["max_nonfinite"]:
                    raise RuntimeError(f"{state['nonfinite_run']} non-finite losses in a row at step {step} "
                                       f"(max_nonfinite {s['max_nonfinite']}): lower the lr, check the data")
            sched.step()
            state["step"] = step
            record = {"step": step, "lr": sched.get_last_lr()[0]}
            if ok and (step % s["log_every"] == 0 or step == s["steps"]):
                rate = seg_done / max(time.time() - t_start, 1e-9)
                record.update({f"train/{k}": v for k, v in terms_sum.items()},
                              grad_norm=float(gnorm), segments_per_s=rate)
                eta = (s["steps"] - step) * s["batch_size"] * s["grad_accum"] / max(rate, 1e-9)
                console.print(f"{phase} step {step}/{s['steps']} loss {terms_sum['loss']:.4f} "
                              f"lr {record['lr']:.2e} {rate:.1f} seg/s eta {eta:.0f} s")
                bar.update(task, info=f"loss {terms_sum['loss']:.4f} lr {record['lr']:.2e} {rate:.1f} seg/s")
            bar.update(task, completed=step)
            if step % s["val_every"] == 0 or step == s["steps"]:
                record["val/loss"] = validate(model, loss_fn, val, s["batch_size"], device, autocast)
                state["best"] = sorted(state["best"] + [[record["val/loss"], step]])[: s["keep_best"]]
                console.print(f"{phase} step {step}: validation loss {record['val/loss']:.4f}")
                model.train()
            if len(record) > 2:
                log_metrics(metrics_path, tb, record)
            if step % s["ckpt_every"] == 0 or "val/loss" in record or step == s["steps"]:
                save_checkpoint(ckdir, step, model, opt, sched, state)
                prune_checkpoints(ckdir, state)
    tb.close()

    # ---- phase outputs -------------------------------------------------------------------------
    model.eval().cpu()
    extra = {"phase": phase, "run": run, "steps": s["steps"], "settings": s, "init": start_weights,
             "best_val": state["best"], "nonfinite_skipped": state["nonfinite_total"]}
    if lora_cfg is not None:
        from ..model.lora import merge_lora, save_lora
        save_lora(model, out / "lora_weights.safetensors", lora_cfg, adapter, base_digest=base_digest)
        merge_lora(model)
    save_model(model, out, extra)
    console.print(f"[bold]{phase} done[/]: {out}/model.safetensors (best validation "
                  f"{state['best'][0][0]:.4f} at step {state['best'][0][1]})")
    return state




def read_weights(path) -> dict:
    """Weights from a model folder / step checkpoint (model.safetensors), a .safetensors file, or
    a .pt/.bin file (final.pt's state_dict or a plain state dict), always weights_only."""
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_weights(path / name)
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    if path.suffix == ".safetensors":
        return load_file(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob.get("state_dict", blob)


def warm_start(model, path, groups, pf) -> str:
    """Load `path` into the model: strictly, else non-strictly with a table of missing, unexpected
    and shape-mismatched keys. Refuses frozen (encoder/quantizer) tensors that differ from the codec,
    and missing trained keys that no init covers (only the new block's come from `init`)."""
    from rich.table import Table
    sd, own = read_weights(path), model.state_dict()
    mismatched = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    changed = [k for k in sd if k.startswith(FROZEN_FOREVER) and k in own and k not in mismatched
               and not torch.equal(sd[k], own[k])]
    if changed:
        pf.add("init_checkpoint", False, f"{path}: {len(changed)} encoder/quantizer tensors differ from the "
               f"codec's (e.g. {changed[0]}): the codes would change meaning")
        pf.finish()
    trained = [g["pattern"] for g in groups if g.get("trainable", True)]
    uncovered = [k for k in missing + mismatched if not k.startswith("decoder.new_block.") and "lora_" not in k
                 and any(matches(k, p) for p in trained)]
    if uncovered:
        pf.add("init_checkpoint", False, f"{path} lacks {len(uncovered)} tensors this phase trains and no init "
               f"covers (e.g. {uncovered[:3]})")
        pf.finish()
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in mismatched}, strict=False)
    if missing or unexpected or mismatched:
        t = Table(title=f"init_checkpoint {path}: loaded non-strictly")
        for c in ("missing (kept from init)", "unexpected (ignored)", "shape mismatch (kept from init)"):
            t.add_column(c)
        cols = [missing, unexpected, [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]]
        for i in range(min(20, max(map(len, cols)))):
            t.add_row(*(c[i] if i < len(c) else "" for c in cols))
        console.print(t)
    pf.add("init_checkpoint", True, f"{path}: {'strict' if not (missing or unexpected or mismatched) else 'non-strict'}"
           f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} shape-mismatched); "
           "fresh optimizer, step 0")
    return state_digest(sd)


class Preflight:
    """The checklist every training job prints (rich table) and saves (preflight.json) before it
    trains; a failed item stops the job with its reason."""

    def __init__(self, path: Path, phase: str):
        self.path, self.phase, self.items = path, phase, []

    def add(self, item: str, ok: bool, detail: str) -> bool:
        self.items.append({"item": item, "ok": bool(ok), "detail": detail})
        return ok

    def finish(self) -> None:
        from rich.table import Table
        t = Table(title=f"preflight: {self.phase}")
        for c in ("", "item", "detail"):
            t.add_column(c)
        for it in self.items:
            t.add_row("[green]ok" if it["ok"] else "[bold red]FAIL", it["item"], it["detail"])
        console.print(t)
        failed = [it for it in self.items if not it["ok"]]
        dump_json({"phase": self.phase, "ok": not failed, "items": self.items}, self.path)
        if failed:
            raise RuntimeError("preflight failed: " + "; ".join(f"{it['item']}: {it['detail']}" for it in failed))


def lr_lambda(s: dict):
    """Linear warmup over warmup_steps, then cosine from 1 to lr_min_ratio at `steps`."""
    warm, total, floor = s["warmup_steps"], s["steps"], s["lr_min_ratio"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


@torch.no_grad()
def validate(model, loss_fn, val, batch_size, device, autocast) -> float:
    from ..model.codec import noise_disabled
    model.eval()
    total, n = 0.0, 0
    with noise_disabled(model):
        for i in range(0, len(val), batch_size):
            codes, target = collate(val[i:i + batch_size])
            with autocast:
                pred = model.decode([c.to(device) for c in codes])
            loss, _ = loss_fn(pred.float(), target.to(device))
            total += float(loss) * target.shape[0]
            n += target.shape[0]
    return total / n


# ---- checkpoints ------------------------------------------------------------------------------
def step_dir(ckdir: Path, step: int) -> Path:
    return ckdir / f"step_{step:07d}"


def save_checkpoint(ckdir: Path, step: int, model, opt, sched, state: dict) -> Path:
    """Write a step checkpoint into a temp dir, then rename: a kill never leaves a half one."""
    from safetensors.torch import save_file
    final = step_dir(ckdir, step)
    tmp = ckdir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(ckdir: Path, run: str):
    """Newest complete checkpoint of this run; checkpoints of other runs are removed."""
    if not ckdir.is_dir():
        return None
    mine = []
    for d in sorted(ckdir.glob("step_*")):
        try:
            other = json.loads((d / "trainer_state.json").read_text())["run"]
        except (OSError, ValueError, KeyError):
            other = None
        if other == run:
            mine.append(d)
        else:
            console.print(f"[yellow]removing {d}: it belongs to another run (settings or inputs changed)")
            shutil.rmtree(d)
    for d in ckdir.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    return mine[-1] if mine else None


def load_checkpoint(d: Path, model, opt, sched) -> dict:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    rng = torch.load(d / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((d / "trainer_state.json").read_text())


def prune_checkpoints(ckdir: Path, state: dict) -> None:
    """Keep the newest checkpoint (for resume) and the keep_best best by validation loss."""
    keep = {state["step"]} | {step for _, step in state["best"]}
    for d in ckdir.glob("step_*"):
        if int(d.name.split("_")[1]) not in keep:
            shutil.rmtree(d, ignore_errors=True)


# ---- metrics ----------------------------------------------------------------------------------
def log_metrics(path: Path, tb, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    for k, v in record.items():
        if k != "step":
            tb.add_scalar(k, v, record["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in lines))
