"""The trainer: one phase of the 48 kHz decoder, read top to bottom as named steps.

    train()                   lock the phase folder, catch stop signals, then:
      setup()                   one Trainer: setup_data -> setup_model -> setup_groups -> setup_run
                                (device, precision, checkpointing) -> setup_adversarial ->
                                setup_optimizer -> resume -> setup_loader
      train_step()              one optimizer step over grad_accum micro-batches, each a
                                micro_batch(): forward, losses, discriminators, backward
      validate(), save()        held-out loss (evaluation precision), step checkpoint
      finish()                  phase outputs (+ LoRA file), the run marked finished

Batch k of a run is a pure function of (seed, k): a resumed run reads exactly the batches an
uninterrupted one reads, and a skipped (non-finite) step still consumes its micro-batches.

A run is identified by its run settings (pipeline.settings.run_settings: runtime knobs such as
workers or logging intervals are not part of it), its starting weights, the cache fingerprint and
the content digests of its training shards. Checkpoint handling (resume after a kill, retrain
after a finished run, other runs moved aside) is described in pipeline.training.checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import TextColumn

from ..data.cache import CACHE_FORMAT, CacheError
from ..data.manifest import n_q_of
from ..data.segments import SegmentBatches, build_pool, collate, fixed_segments, open_training_cache
from ..model import codecs
from ..model.codecs.base import state_digest
from ..model.snake import script_calls
from ..settings import EVAL_DEFAULTS, TRAIN_DEFAULTS, check_segment, run_settings, segment_frames
from ..ui import console, progress
from . import checkpoint, distributed
from . import device as dev
from .device import compile_cache, compile_in_place, compiled, copy_to, fp32_math, set_precision, use_compile
from .discriminators import Adversarial
from .figures import tb_log_samples
from .groups import lora_config, param_groups
from .guards import PhaseLock, StopRequest, Stopped, ignore_stop_signals
from .losses import Padding, ReconstructionLoss
from .preflight import Preflight
from .schedules import lr_lambda
from .stages import DecoderRun
from .warmstart import read_weights, warm_start


def train(phase, s, codec_dir, cache_paths, heldout_paths, init_dir, out_dir, *, target_rate,
          resume_from=None, adapter="default", metrics=None) -> dict:
    """Train one phase into out_dir. `s`: the job's settings, run settings and runtime knobs
    together, complete and checked as pipeline.settings.phase_settings returns them (callers that
    build them by hand: pipeline.settings.complete); they are used as they are.
    target_rate: the configured codec.target_rate (the cache must have been built for it);
    resume_from: a step checkpoint of this same run; adapter: the LoRA adapter's name;
    metrics: the evaluation's `n_ffts` and `lsd_floor_db` that select: rank_sum scores with
    (default: the eval section's defaults).

    A setting's road from the config to where it acts, e.g. a phase's lr to the optimizer, in six
    hops, through pipeline/settings.py once:
      1. config: train.<phase>.lr (or train.defaults.lr, or the schema's default)
      2. settings.phase_settings, at parse time: layered, filled in, checked (a mistake stops the
         workflow before any job, naming the key), split into run settings and runtime knobs
      3. the train rule's params `settings` and `runtime` (JSON; the former is the run's identity)
      4. `python -m pipeline train --settings ... --runtime ...`
      5. train(s) -> setup(s)
      6. param_groups(model, s["groups"], s["lr"]) -> torch.optim.AdamW"""
    missing = sorted({*TRAIN_DEFAULTS, "source_weights"} - s.keys())
    if missing:
        raise ValueError(f"train.{phase}: settings without {', '.join(missing)}: build them with "
                         "pipeline.settings.phase_settings (or settings.complete)")
    out = Path(out_dir)
    group, device = distributed.init(s["device"])
    console.quiet = not group.main                 # rank 0 speaks and writes for all
    try:
        with PhaseLock(out) if group.main else nullcontext(), StopRequest() as stop:
            t = setup(phase, s, group=group, device=device, codec_dir=codec_dir, target_rate=target_rate,
                      cache_paths=cache_paths, heldout_paths=heldout_paths, out=out, init_dir=init_dir,
                      resume_from=resume_from, adapter=adapter)
            with progress(TextColumn("{task.fields[info]}")) as bar:
                task = bar.add_task(phase, total=s["steps"], completed=t.state["step"], info="")
                for step in range(t.state["step"] + 1, s["steps"] + 1):
                    record = train_step(t, step)
                    stopping = group.sum([bool(stop.requested)])[0] > 0     # any rank asked: all stop here
                    due_val = step % s["val_every"] == 0 or step == s["steps"]
                    if due_val:
                        record["val/loss"] = validate(t)
                        t.state["best"] = sorted(t.state["best"] + [[record["val/loss"], step]])[: s["keep_best"]]
                    log(t, record, bar, task)
                    if due_val or step % s["ckpt_every"] == 0 or stopping:
                        save(t)
                    if stopping:
                        raise Stopped(f"{phase} stopped at step {step} ({stop.requested or 'another rank stopped'});"
                                      f" checkpoint written to {checkpoint.step_dir(t.ckdir, step)}: rerun to resume",
                                      stop.code or 1)
            return finish(t, metrics or {})
    finally:
        distributed.close(group)


@dataclass
class Trainer:
    phase: str
    s: dict
    out: Path
    group: distributed.Group
    device: torch.device
    rate: int                    # target sample rate
    model: torch.nn.Module
    trainable: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: torch.nn.Module
    decoder: torch.nn.Module     # the decoder path for training (stages.DecoderRun: precision, checkpointing), in
                                 # DistributedDataParallel with several processes, compiled with `compile`
                                 # (validation and saving use the model itself)
    val: list                    # fixed held-out segments
    run: str
    start_weights: str
    state: dict
    lora: tuple | None = None    # (LoRAConfig, adapter name, base digest)
    adv: object = None           # Adversarial (discriminators, their optimizer) when enabled
    batches: object = None       # iterator over (codes, target, mask) micro-batches
    tb: object = None
    timer: dict = field(default_factory=lambda: {"t0": time.perf_counter(), "segments": 0, "wait": 0.0,
                                                 "paused": 0.0})   # since the last log line

    @property
    def ckdir(self) -> Path:
        return self.out / "checkpoints"


# ---- setup --------------------------------------------------------------------------------------
def setup(phase, s, *, group, device, codec_dir, target_rate, cache_paths, heldout_paths, out, init_dir=None,
          resume_from=None, adapter="default") -> Trainer:
    """One Trainer, in named steps, each adding its checks to the preflight report: the data (the
    cache this codec built), the model (start weights, LoRA, what trains), the run on the device
    (precision, activation checkpointing, compile, discriminators), the optimizer, resume, then the
    loader and the logs."""
    out.mkdir(parents=True, exist_ok=True)
    seed(s)
    pf = Preflight(out / "preflight.json", phase, write=group.main)
    data = setup_data(phase, s, group, codec_dir, target_rate, cache_paths, heldout_paths, pf)
    model, start_weights, lora = setup_model(s, data, init_dir, target_rate, adapter, pf)
    groups = setup_groups(s, model, pf)
    decoder, fast = setup_run(s, model, group, device, pf)
    adv = setup_adversarial(s, data.geo, group, device, fast, pf)
    opt, sched = setup_optimizer(s, groups, pf)
    loss_fn = ReconstructionLoss(data.geo.target_rate, s["lambdas"], n_ffts=s["n_ffts"], n_mels=s["n_mels"]).to(device)
    run = hashlib.sha256(json.dumps([phase, run_settings(s), start_weights, data.fp, [sh.digest for sh in data.shards]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    t = Trainer(phase, s, out, group, device, data.geo.target_rate, model, [p for g in groups for p in g["params"]], opt,
                sched, loss_fn, decoder, data.val, run, start_weights, state=new_state(run, phase), lora=lora, adv=adv)
    resume(t, resume_from, pf)
    pf.finish()
    t.batches = setup_loader(t, data)
    if group.main:
        from torch.utils.tensorboard import SummaryWriter
        t.tb = SummaryWriter(out / "tensorboard", purge_step=t.state["step"] or None)
        truncate_metrics(out / "metrics.jsonl", t.state["step"])
    return t


def seed(s: dict) -> None:
    """The global seed, and deterministic kernels when asked (the same numbers on every rerun)."""
    if s["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(s["seed"])


@dataclass
class Data:
    codec: torch.nn.Module       # the frozen codec (model/codecs), at the cache's n_q
    fp: dict                     # its cache fingerprint at the target rate
    geo: object                  # the cache's geometry (rates, hop, strides, quantum)
    shards: list                 # training shards
    pool: object                 # the utterances segments are drawn from, after filters
    n_frames: int                # frames per training segment
    val: list                    # fixed held-out segments


def setup_data(phase, s, group, codec_dir, target_rate, cache_paths, heldout_paths, pf: Preflight) -> Data:
    """The codec, and the cache it built at the configured target rate; the segments and what they
    are drawn from; the batch split over the processes."""
    try:
        codec = codecs.load(codec_dir, n_q_of(cache_paths))
    except ValueError as e:                 # e.g. a Mimi cache's n_q given to a SNAC codec
        pf.fail("cache = codec's, at codec.target_rate", f"{codec_dir} cannot read this cache's codes: {e}")
    fp = codec.fingerprint(target_rate, CACHE_FORMAT)
    pf.add("codec weights loaded", True, f"{codec_dir} (sha256 {fp['codec_digest'][:12]})")
    try:
        shards = open_training_cache(cache_paths, fp, s["preload"])
        heldout = open_training_cache(heldout_paths, fp, s["preload"])
    except CacheError as e:
        pf.fail("cache = codec's, at codec.target_rate", str(e))
    geo = shards[0].geometry
    pf.add("cache = codec's, at codec.target_rate", True,
           f"{len(shards)} + {len(heldout)} held-out shards; codes at {geo.codec_rate} Hz (hop {geo.hop}, "
           f"strides {list(geo.strides)}, attention window {geo.attn_window}) -> targets at {geo.target_rate} Hz")
    n_frames = segment_frames(s["segment_seconds"], geo)
    try:
        check_segment(s, geo, f"train.{phase}")
    except ValueError as e:
        pf.fail("loss sizes fit a segment", str(e))
    pool = build_pool(shards, n_frames, s["dataset_ids"], s["allow_bandlimited"])
    pf.add("utterances after filters", len(pool.items) > 0,
           f"{len(pool.items)} (excluded: {pool.excluded or 'none'}); segments of {n_frames} frames = "
           f"{n_frames * geo.hop_target / geo.target_rate:.3f} s (multiples of {geo.quantum} frames)")
    if s["source_weights"]:
        per = [sum(it[3] == k for it in pool.items) for k in range(len(s["source_weights"]))]
        pf.add("manifest sampling weights", all(per), ", ".join(
            f"manifest {k}: weight {w:g}, {n} utterances" for k, (w, n) in enumerate(zip(s["source_weights"], per))))
    val = fixed_segments(heldout, n_frames, s["val_batches"] * s["batch_size"])
    pf.add("validation segments", len(val) > 0, f"{len(val)} from the held-out cache")
    pf.add("processes", s["batch_size"] % group.world == 0,
           f"{group.world} (batch {s['batch_size']}: {s['batch_size'] // group.world} segments per process)"
           if s["batch_size"] % group.world == 0 else
           f"batch_size {s['batch_size']} does not split over {group.world} processes (nproc_per_node x nnodes)")
    return Data(codec, fp, geo, shards, pool, n_frames, val)


def setup_model(s, data: Data, init_dir, target_rate, adapter, pf: Preflight) -> tuple:
    """The 48 kHz model to train: the previous phase's output (its encoder side must be the
    codec's), or the codec with a new block; a warm start; LoRA adapters when the phase has them.
    -> (model, start weights' identity, (LoRAConfig, adapter, base digest) or None)."""
    codec = data.codec
    if init_dir:
        model = codecs.load_model(init_dir)
        same = type(model).FAMILY == codec.FAMILY and all(
            state_digest(part.state_dict()) == state_digest(ref.state_dict())
            for part, ref in zip(model.frozen_parts(), codec.frozen_parts()))
        pf.add("start weights", same, f"{init_dir}" if same else
               f"{init_dir}: its encoder side ({', '.join(p.rstrip('.') for p in codec.FROZEN)}) differs from the "
               "codec's; the codes would not mean the same thing")
        start_weights = json.loads((Path(init_dir) / "config.json").read_text())["weights_digest"]
    else:
        model = codecs.from_codec(codec, target_rate, s["init"], s["seed"], s["interpolator"])
        start_weights = f"{data.fp['codec_digest']}:{s['init']}"
        how = f"smart init ({s['interpolator']})" if s["init"] == "smart" else f"{s['init']} init"
        pf.add("start weights", True, f"codec + new block, {how}")
    if s["init_checkpoint"]:
        start_weights = warm_start(model, s["init_checkpoint"], s["groups"], pf)
    lora = None
    if s["lora"]["enabled"]:
        from ..model.lora import apply_lora
        base_digest = model.base_digest()
        cfg = lora_config(s)
        wrapped = apply_lora(model, cfg, adapter)
        pf.add("LoRA adapters", bool(wrapped), f"{adapter!r}: rank {cfg.rank}, alpha {cfg.alpha} on {len(wrapped)} modules")
        lora = (cfg, adapter, base_digest)
    return model, start_weights, lora


def setup_groups(s, model, pf: Preflight) -> list:
    """The optimizer's parameter groups: what trains, at which lr (the phase's `groups`)."""
    try:
        groups, counts = param_groups(model, s["groups"], s["lr"])
    except ValueError as e:
        pf.fail("trainable parameters", str(e))
    pf.add("trainable parameters", sum(c["trainable"] for c in counts) > 0,
           "; ".join(f"{c['pattern']}: {c['params']:,}" + (f" x{c['lr_factor']:g} lr" if c["trainable"] else " frozen")
                     for c in counts))
    return groups


def setup_run(s, model, group, device, pf: Preflight) -> tuple:
    """The model on the device, and the trainer's own decoder path (stages.DecoderRun): the
    precision and activation checkpointing this phase chose live there, not on the model; in
    DistributedDataParallel with several processes, compiled with `compile`. -> (decoder path,
    whether compiled)."""
    model.to(device)
    low, how = set_precision(s["precision"], device, model)
    decoder = DecoderRun(model, low, s["activation_checkpointing"])
    if group.world > 1:
        decoder = torch.nn.parallel.DistributedDataParallel(decoder, device_ids=[device] if device.type == "cuda" else None)
    if s["activation_checkpointing"]:
        scripted = [c for m in decoder.modules() for c in script_calls(m)]
        pf.add("activation checkpointing", not scripted, "no TorchScript in the decoder's forward" if not scripted else
               f"TorchScript in the decoder's forward breaks the recomputation: {', '.join(sorted(set(scripted)))}")
    fast = use_compile(s["compile"], device)
    if fast:
        cache = compile_cache()                       # before torch.compile settles on one
        decoder = compiled(decoder)
    pf.add("device / precision", True, f"{device} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
           f"{s['precision']}: {how}" + ("; activation checkpointing" if s["activation_checkpointing"] else "")
           + (f"; torch.compile ({dev.BACKEND}, kernels cached in {cache})" if fast else "")
           + "; validation in IEEE fp32")
    return decoder, fast


def setup_adversarial(s, geo, group, device, fast: bool, pf: Preflight):
    """The discriminators and their optimizer when the phase has them (else None)."""
    if not s["adversarial"]["enabled"]:
        return None
    a = s["adversarial"]
    adv = Adversarial(a, geo, seed=s["seed"]).to(device)
    adv.sync = group.average_grads
    if fast:
        compile_in_place(adv.discriminator)
    pf.add("adversarial", True, f"{a['loss']} from step {a['start_step'] + 1}: periods {a['periods']}, STFT sizes "
           f"{a['stft_n_ffts']} ({sum(p.numel() for p in adv.params):,} parameters); lambdas {a['lambdas']}")
    return adv


def setup_optimizer(s, groups: list, pf: Preflight) -> tuple:
    """AdamW over the groups and the lr schedule. -> (optimizer, scheduler)."""
    opt = torch.optim.AdamW(groups, lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s))
    pf.add("schedule", True, f"{s['schedule']}: lr {s['lr']:g}, warmup {s['warmup_steps']} of {s['steps']} steps, "
           f"to x{s['lr_min_ratio']}; batch {s['batch_size']} x accum {s['grad_accum']}")
    return opt, sched


def setup_loader(t: Trainer, data: Data):
    """Micro-batches from the step the run resumes at: pinned on CUDA (copies that need no wait),
    prefetched for two optimizer steps; batch k is a pure function of (seed, k)."""
    s = t.s
    batches = SegmentBatches(data.shards, data.pool, data.n_frames, s["batch_size"], s["seed"],
                             s["steps"] * s["grad_accum"], s["source_weights"], share=(t.group.rank, t.group.world))
    workers = s["num_workers"]
    return iter(torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(t.state["step"] * s["grad_accum"], len(batches))),
        batch_size=None, num_workers=workers, prefetch_factor=max(2, -(-2 * s["grad_accum"] // workers)) if workers else None,
        pin_memory=t.device.type == "cuda", worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(s["seed"])))   # not the global RNG: resume restores that


def new_state(run: str, phase: str) -> dict:
    return {"run": run, "phase": phase, "step": 0, "best": [], "nonfinite_total": 0, "nonfinite_run": 0,
            "segments_seen": 0, "seconds_seen": 0.0}


def resume(t: Trainer, resume_from, pf: Preflight) -> None:
    """Continue this run from its newest readable step checkpoint, unless the run had finished
    (then this is a forced rerun: train again from step 0) or resume is off."""
    if resume_from:
        ck = checkpoint.read(Path(resume_from))
        if ck.state["run"] != t.run:
            pf.fail("resume", f"{resume_from} belongs to run {ck.state['run']}, not this one ({t.run}): settings or "
                    "inputs differ, so an exact resume is impossible; use init_checkpoint (warm restart)")
    elif t.group.main:
        ck = checkpoint.newest_readable(t.ckdir, t.run)
        if ck and ck.state.get("finished"):
            checkpoint.move_aside(t.ckdir, checkpoint.step_dirs(t.ckdir),
                                  "this run had finished, so this is a forced rerun: training again from step 0")
            ck = None
        elif ck and not t.s["resume"]:
            checkpoint.move_aside(t.ckdir, checkpoint.step_dirs(t.ckdir), "resume is off")
            ck = None
        t.group.broadcast(ck.path if ck else None)
    else:                                            # the other ranks load what rank 0 chose
        path = t.group.broadcast(None)
        ck = checkpoint.read(path) if path else None
    if ck is None:
        pf.add("resume", True, "from step 0")
        return
    t.model.load_state_dict(ck.weights, strict=True)
    t.opt.load_state_dict(ck.parts["optimizer"])
    t.sched.load_state_dict(ck.parts["scheduler"])
    if t.adv:
        t.adv.load_state_dict(ck.parts["adversarial"])
    torch.set_rng_state(ck.parts["rng"]["torch"])
    if "cuda" in ck.parts["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck.parts["rng"]["cuda"])
    t.state = {**new_state(t.run, t.phase), **ck.state}
    pf.add("resume", True, f"from {ck.path} (step {t.state['step']} of {t.s['steps']})")
    console.print(f"[bold green]resuming[/] {t.phase} from {ck.path} (step {t.state['step']} of {t.s['steps']})")


# ---- one training step ----------------------------------------------------------------------------
def train_step(t: Trainer, step: int) -> dict:
    """grad_accum micro-batches, then one optimizer step, skipped (and counted) when the loss or
    the gradient norm is not finite. Every micro-batch is consumed either way.

    The host never waits for the GPU inside the micro-batches: what the step needs of the mask is
    read on the CPU before the copy (next_batch), loss terms stay device tensors, and the one
    wait per optimizer step is the gradient norm's finiteness check; at log steps the terms
    become numbers in one transfer (Group.mean_terms)."""
    s, st = t.s, t.state
    t.model.train()
    t.opt.zero_grad(set_to_none=True)
    sums, counts, finite, seconds = {}, {}, None, 0.0    # term -> sum over the micro-batches (device tensors)
    for i in range(s["grad_accum"]):
        batch, pad, real = next_batch(t)
        loss, terms = micro_batch(t, step, i, batch, pad)
        finite = torch.isfinite(loss) if finite is None else finite & torch.isfinite(loss)
        seconds += real
        for k, v in {"loss": loss.detach(), **terms}.items():
            sums[k], counts[k] = sums[k] + v if k in sums else v, counts.get(k, 0) + 1
    gnorm = torch.nn.utils.clip_grad_norm_(t.trainable, s["grad_clip"] or float("inf"))
    ok = bool(torch.isfinite(gnorm))                 # the step's one wait for the GPU
    if ok:
        t.opt.step()
        st["nonfinite_run"] = 0
    else:
        st["nonfinite_run"] += 1
        st["nonfinite_total"] += 1
        console.print(f"[yellow]step {step}: non-finite {'gradient norm' if finite else 'loss'}, step skipped "
                      f"({st['nonfinite_run']} in a row, {st['nonfinite_total']} in all)")
        if st["nonfinite_run"] >= s["max_nonfinite"]:
            raise RuntimeError(f"{st['nonfinite_run']} non-finite steps in a row at step {step} "
                               f"(max_nonfinite {s['max_nonfinite']}): lower the lr, check the data")
    t.sched.step()
    st["step"] = step
    st["segments_seen"] += s["batch_size"] * s["grad_accum"]
    st["seconds_seen"] += t.group.sum([seconds])[0]
    t.timer["segments"] += s["batch_size"] * s["grad_accum"]
    record = {"step": step, "lr": t.sched.get_last_lr()[0], "segments_seen": st["segments_seen"],
              "seconds_seen": round(st["seconds_seen"], 3), "nonfinite_total": st["nonfinite_total"]}
    if ok and (step % s["log_every"] == 0 or step == s["steps"]):
        means = t.group.mean_terms({**{f"train/{k}": v / counts[k] for k, v in sums.items()}, "grad_norm": gnorm})
        record.update(means, **rates(t))
    return record


def micro_batch(t: Trainer, step: int, i: int, batch, pad: Padding, mark=lambda part: None) -> tuple:
    """Micro-batch i of the step: decoder forward, losses, the discriminators (their step, then the
    generator's adversarial loss), backward. -> (loss, terms). `mark(part)` after each part (bench
    step_parts times them)."""
    s, (codes, target, mask) = t.s, batch
    # several processes: gradients are averaged on the last micro-batch's backward only
    with t.decoder.no_sync() if t.group.world > 1 and i < s["grad_accum"] - 1 else nullcontext():
        pred = t.decoder(t.model.latents(codes))
        mark("decoder forward")
        loss, terms = t.loss_fn(pred, target, pad)
        mark("reconstruction losses")
        if t.adv and t.adv.active(step):        # one discriminator step per optimizer step
            seen = t.adv.crop(target, pred, mask, pad.lengths, key=(step, i, t.group.rank))   # what they see
            terms.update(t.adv.discriminator_step(*seen, part=(i, s["grad_accum"])))
            mark("discriminators: their step")
            g, g_terms = t.adv.generator_loss(*seen)
            loss, terms = loss + g, {**terms, **g_terms}
            mark("discriminators: generator loss")
        # backward even when not finite: every process runs the same collectives, and the NaN
        # reaches the averaged gradient norm on every process, which then skips the step
        (loss / s["grad_accum"]).backward()
        mark("backward")
    return loss, terms


def next_batch(t: Trainer):
    """The next micro-batch on the device, with what the step needs of its mask read on the CPU
    before the copy: a Padding for the losses and the seconds of real audio (padding does not
    count). -> ((codes, target, mask), padding, seconds)."""
    w = time.perf_counter()
    codes, target, mask = next(t.batches)
    t.timer["wait"] += time.perf_counter() - w
    pad = Padding(mask)
    batch = [copy_to(c, t.device) for c in codes], copy_to(target, t.device), copy_to(mask, t.device)
    return batch, pad, pad.samples / t.rate


def rates(t: Trainer) -> dict:
    """Since the last log line, validation excluded: segments per second and the share of that
    time the trainer waited for its loader; the window starts again."""
    now, tm = time.perf_counter(), t.timer
    busy = max(now - tm["t0"] - tm["paused"], 1e-9)
    out = {"segments_per_s": tm["segments"] / busy, "loader_wait": round(tm["wait"] / busy, 4)}
    t.timer.update(t0=now, segments=0, wait=0.0, paused=0.0)
    return out


# ---- validation, logging, checkpoints -------------------------------------------------------------
@torch.no_grad()
def validate(t: Trainer) -> float:
    """Held-out loss on fixed segments, noise off, in fp32 like the evaluation (the bf16 split
    applies in training mode only)."""
    t.model.eval()
    began = time.perf_counter()
    mine = t.val[t.group.rank::t.group.world]          # split across processes, summed below
    total, n = 0.0, 0
    with t.model.noise_disabled(), fp32_math(t.device):
        for i in range(0, len(mine), t.s["batch_size"]):
            codes, target, mask = collate(mine[i:i + t.s["batch_size"]])
            pred = t.model.decode([c.to(t.device) for c in codes])
            loss, _ = t.loss_fn(pred, target.to(t.device), mask)     # the mask read where it is, on the CPU
            total += float(loss) * target.shape[0]
            n += target.shape[0]
            if i == 0 and t.group.main:          # listen to and look at the first segments
                tb_log_samples(t.tb, t.state["step"], {t.phase: pred}, target, t.rate, t.model.geometry.codec_rate / 2)
    total, n = t.group.sum([total, n])
    t.timer["paused"] += time.perf_counter() - began      # not training time (rates)
    return total / n


def log(t: Trainer, record: dict, bar, task) -> None:
    if not t.group.main:
        return
    step, s = record["step"], t.s
    bar.update(task, completed=step)
    if "train/loss" in record:
        rate = record["segments_per_s"]
        eta = (s["steps"] - step) * s["batch_size"] * s["grad_accum"] / max(rate, 1e-9)
        wait = f", {100 * record['loader_wait']:.0f} % waiting for data" if record["loader_wait"] >= 0.05 else ""
        console.print(f"{t.phase} step {step}/{s['steps']} loss {record['train/loss']:.4f} lr {record['lr']:.2e} "
                      f"{rate:.1f} seg/s{wait}, {record['seconds_seen'] / 3600:.2f} h of audio seen, eta {eta:.0f} s")
        bar.update(task, info=f"loss {record['train/loss']:.4f} lr {record['lr']:.2e} {rate:.1f} seg/s")
    if "val/loss" in record:
        console.print(f"{t.phase} step {step}: validation loss {record['val/loss']:.4f}")
    if "train/loss" in record or "val/loss" in record:
        with open(t.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                t.tb.add_scalar(k, v, step)


def save(t: Trainer) -> None:
    """A step checkpoint, then keep only the newest (for resume) and the keep_best best."""
    if not t.group.main:
        return
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    parts = {"optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(), "rng": rng}
    if t.adv:
        parts["adversarial"] = t.adv.state_dict()
    checkpoint.save(t.ckdir, t.state["step"], t.model.state_dict(), parts, t.state)
    checkpoint.prune(t.ckdir, {t.state["step"]} | {step for _, step in t.state["best"]})


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they will be logged again), and any line
    that is not a record (the partial last line of a kill mid-write), with a warning naming the
    file and line. Rewritten atomically."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            past = record["step"] > step
        except (ValueError, TypeError, KeyError):
            console.print(f"[yellow]{path}: line {n} is not JSON with a step (a write cut short by a kill?): dropped")
            continue
        if not past:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


# ---- finish ---------------------------------------------------------------------------------------
def finish(t: Trainer, metrics: dict) -> dict:
    """Phase outputs (model.safetensors + config.json, + lora_weights.safetensors), then the last
    checkpoint is marked finished: asked again, this run trains from step 0 (a forced rerun)."""
    if not t.group.main:
        return t.state
    t.tb.close()
    model = t.model.eval()
    extra = {"phase": t.phase, "run": t.run, "steps": t.s["steps"], "settings": run_settings(t.s),
             "init": t.start_weights, "best_val": t.state["best"], "nonfinite_skipped": t.state["nonfinite_total"],
             "segments_seen": t.state["segments_seen"], "seconds_seen": round(t.state["seconds_seen"], 3)}
    if t.s["select"] == "rank_sum":
        extra["selected"] = select_by_rank_sum(t, **metrics)
    model.cpu()
    if t.lora is not None:
        from ..model.lora import merge_lora, save_lora
        cfg, adapter, base_digest = t.lora
        save_lora(model, t.out / "lora_weights.safetensors", cfg, adapter, base_digest=base_digest)
        merge_lora(model)
    codecs.save_model(model, t.out, extra)
    checkpoint.mark_finished(checkpoint.step_dir(t.ckdir, t.state["step"]))
    best = f" (best validation {t.state['best'][0][0]:.4f} at step {t.state['best'][0][1]})" if t.state["best"] else ""
    console.print(f"[bold]{t.phase} done[/]: {t.out}/model.safetensors{best}")
    return t.state


def select_by_rank_sum(t: Trainer, n_ffts=EVAL_DEFAULTS["n_ffts"],
                       lsd_floor_db=EVAL_DEFAULTS["lsd_floor_db"]) -> dict:
    """Load, of the kept checkpoints, the one with the best rank-sum over the evaluation's metrics
    (computed with its n_ffts and LSD floor) on the validation segments (ties: the newer);
    -> what was chosen and why."""
    from .metrics import rank_sum, segment_metrics
    rows = {}
    for d in checkpoint.step_dirs(t.ckdir):
        t.model.load_state_dict(read_weights(d))          # the weights alone, not the optimizer
        rows[d.name] = segment_metrics(t.model, t.val, device=t.device, n_ffts=tuple(n_ffts),
                                       floor_db=lsd_floor_db)
    order = rank_sum(dict(reversed(rows.items())))          # newest first: it wins ties
    best = order[0]["name"]
    t.model.load_state_dict(read_weights(t.ckdir / best))
    console.print(f"{t.phase}: output = {best}, best rank-sum of {len(rows)} kept checkpoints over "
                  f"{', '.join(order[0]['ranks'])}")
    return {"by": "rank_sum", "checkpoint": best, "ranking": order, "metrics": rows}
