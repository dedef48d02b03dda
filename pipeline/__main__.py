"""`python -m pipeline <command>`: the program every Snakemake rule runs."""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
import traceback

from .settings import PHASES, TRAIN_DEFAULTS

# The commands that run on a GPU when there is one; each drives one device (the first it sees)
# and, on a machine with several, first claims a free one of its own (pipeline/gpus.py).
GPU_COMMANDS = ("train", "evaluate", "precompute-shard", "demo-codec", "gpu-check")


def _json(s: str) -> dict:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


class _OutlivesItsReader:
    """stdout/stderr that survive the death of whoever reads them. SLURM signals every process of a
    cancelled or preempted job at once: the rule's `| tee {log}` dies at the first SIGTERM, and a
    trainer that checkpoints on SIGTERM must not die of a BrokenPipeError at its next print.
    Output nobody can read any more goes to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())
        os.close(null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


CHUNK_HELP = ("audio per chunk (default: CHUNK_SECONDS of pipeline/evaluation/chunked.py); memory "
              "scales with it, not with the input's length")


def main(argv=None) -> int:
    if not isinstance(sys.stdout, _OutlivesItsReader):
        sys.stdout, sys.stderr = _OutlivesItsReader(sys.stdout), _OutlivesItsReader(sys.stderr)
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("demo-data", help="generate the deterministic demo corpus")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})

    c = sub.add_parser("demo-codec", help="build and briefly train the tiny demo SNAC")
    c.add_argument("--manifest", required=True, nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, required=True)
    c.add_argument("--device", default="auto", help="auto: CUDA when there is one (not a setting: never a rerun)")

    c = sub.add_parser("make-manifest", help="train.jsonl + heldout.jsonl (+ skipped.jsonl) from a folder of audio")
    c.add_argument("audio_dir", help="folder scanned recursively for audio files (any format libsndfile reads)")
    c.add_argument("out_dir", help="where the manifests go (their audio paths are relative to it)")
    c.add_argument("--speaker-depth", type=int, default=None, metavar="N",
                   help="the folder level under AUDIO_DIR that names the speaker (1: AUDIO_DIR/<speaker>/...); "
                        "the held-out split then never shares a speaker with training")
    c.add_argument("--heldout-fraction", type=float, default=0.05, help="share of the files held out (default 0.05)")
    c.add_argument("--seed", type=int, default=0, help="which speakers (or files) are held out")
    c.add_argument("--workers", type=int, default=16, help="threads reading the audio headers")

    c = sub.add_parser("precompute-shard", help="encode one shard of a manifest into the zarr cache")
    c.add_argument("--manifest", required=True, nargs="+", help="one or more manifests, in config order")
    c.add_argument("--shard", type=int, required=True)
    c.add_argument("--n-shards", type=int, required=True)
    c.add_argument("--codec", required=True, help="codec folder (config.json + weights)")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})
    c.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON: device), merged over --settings")

    c = sub.add_parser("precompute-summary", help="rejects.jsonl + summary.json for a manifest")
    c.add_argument("--manifest", required=True, nargs="+")
    c.add_argument("--out-dir", required=True)
    c.add_argument("shards", nargs="+")

    c = sub.add_parser("cache-info", help="shards, utterances, seconds and fingerprint of a cache "
                                          "(exits non-zero when it is incomplete or damaged)")
    c.add_argument("cache")
    c.add_argument("--json", action="store_true")
    c.add_argument("--check", action="store_true", help="verify every utterance's checksums and each "
                   "shard's digest, and (with --codec) the alignment of codes and audio")
    c.add_argument("--codec", default=None, help="codec folder, for --check's alignment checks")

    c = sub.add_parser("config-diff", help="each phase's effective settings beside a reference")
    c.add_argument("--config", nargs="+", default=["config/config.yaml"], help="config file(s), layered")
    c.add_argument("--against", default=None, help="another config (layered over the first --config) to compare each phase with")
    c.add_argument("--json", action="store_true")
    c.add_argument("--all", action="store_true", help="also list settings equal to the reference")

    c = sub.add_parser("convert-snac", help="official SNAC folder -> model.safetensors + config.json, verified")
    c.add_argument("src")
    c.add_argument("dst")

    c = sub.add_parser("train", help="train one phase of the 48 kHz decoder")
    c.add_argument("--phase", required=True)
    c.add_argument("--settings", type=_json, required=True, help="the phase's run settings (JSON)")
    c.add_argument("--runtime", type=_json, default={},
                   help="runtime knobs (JSON: workers, device, intervals...), merged over --settings")
    c.add_argument("--codec", required=True)
    c.add_argument("--target-rate", type=int, required=True, help="codec.target_rate: the cache must hold it")
    c.add_argument("--cache", nargs="+", required=True, help="training cache shards")
    c.add_argument("--heldout", nargs="+", required=True, help="held-out cache shards")
    c.add_argument("--init", default=None, help="previous phase's output folder")
    c.add_argument("--out", required=True, help="phase folder")
    c.add_argument("--init-checkpoint", default=None,
                   help="warm restart from these weights (fresh optimizer and schedule, step 0)")
    c.add_argument("--resume-from", default=None, help="exact resume from this step checkpoint of the same run")
    c.add_argument("--no-resume", action="store_true", help="ignore this run's step checkpoints")
    c.add_argument("--adapter", default="default", help="LoRA adapter name (lora phase)")
    c.add_argument("--metrics", type=_json, default=None,
                   help="select: rank_sum: the evaluation's n_ffts and lsd_floor_db (JSON) to score checkpoints with")

    c = sub.add_parser("export", help="merge LoRA and write final.pt + model.safetensors + config.json")
    c.add_argument("--phase-dir", required=True)
    c.add_argument("--out", required=True)

    c = sub.add_parser("evaluate", help="metrics on the held-out cache -> eval.json")
    c.add_argument("--codec", required=True)
    c.add_argument("--heldout", nargs="+", required=True)
    c.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})
    c.add_argument("--runtime", type=_json, default={}, help="runtime knobs (JSON: device), merged over --settings")
    c.add_argument("--target-rate", type=int, default=None, help="codec.target_rate: the held-out cache must hold it")

    c = sub.add_parser("report", help="the report's files: evaluation table, listening page, training curves")
    c.add_argument("--eval", required=True, help="eval.json (eval_clips/ beside it)")
    c.add_argument("--phase", action="append", default=[], metavar="NAME=DIR", help="a phase folder (metrics.jsonl)")
    c.add_argument("--clips", type=int, required=True, help="listening pages to write (eval.report_clips)")
    c.add_argument("--out-dir", required=True)

    c = sub.add_parser("resynth", help="any audio file in, 48 kHz out through the new decoder")
    c.add_argument("--model", required=True)
    c.add_argument("--lora", default=None, help="a lora_weights.safetensors to apply at inference")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--device", default="auto")
    c.add_argument("--chunk-seconds", type=float, default=None, help=CHUNK_HELP)

    c = sub.add_parser("decode", help="decode codes to audio: .npz (one int array per codebook, coarsest first; "
                                      "(batch, codes) arrays give OUTPUT-0, OUTPUT-1, ...) or an Orpheus token "
                                      "list (.json: a JSON array of integers; .txt: integers or <custom_token_N> "
                                      "tokens; 7 tokens a frame, raw or position-offset codes)")
    c.add_argument("--model", required=True)
    c.add_argument("--lora", default=None, help="a lora_weights.safetensors to apply at inference")
    c.add_argument("codes")
    c.add_argument("output")
    c.add_argument("--device", default="auto")
    c.add_argument("--chunk-seconds", type=float, default=None, help=CHUNK_HELP)

    c = sub.add_parser("bench", help="print throughput figures")
    c.add_argument("what", choices=["precompute", "train", "memory", "dag", "decode", "throughput", "precision",
                                    "discriminators"])
    c.add_argument("--seconds", type=float, default=20.0, help="precompute: audio seconds per measurement")
    c.add_argument("--cache-hours", type=float, default=1.0,
                   help="train: hours of synthetic cache, built once under results/bench/ and reused")
    c.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="train: loader worker counts to measure")
    c.add_argument("--segment-seconds", type=float, default=TRAIN_DEFAULTS["segment_seconds"],
                   help="train: segment length (default: the schema's segment_seconds)")
    c.add_argument("--nproc-per-node", type=int, default=None,
                   help="train: compare a training phase run as 1 and as N processes (DDP) instead")
    c.add_argument("--configfile", nargs="+", default=["config/snac_24khz.yaml"],
                   help="memory, throughput, precision, discriminators: the preset(s), layered over config/config.yaml")
    c.add_argument("--phases", nargs="+", default=None, choices=PHASES,
                   help="throughput, precision, discriminators: these phases only (default: every phase of the preset)")
    c.add_argument("--steps", type=int, default=4, help="throughput, precision, discriminators: optimizer steps per timed window")
    c.add_argument("--rows", type=int, default=100_000, help="dag: manifest lines")
    c.add_argument("--shards", type=int, default=64, help="dag: precompute.shards")
    c.add_argument("--rounds", type=int, default=3, help="dag, decode: repetitions of each measurement")
    c.add_argument("--keep", default=None, help="dag: build the synthetic tree in this folder and keep it")
    c.add_argument("--model", default=None, help="decode: a model folder or final.pt (default: random weights of "
                   "--preset's shapes)")
    c.add_argument("--preset", default="snac_24khz", help="decode: a published codec's shapes to build without "
                   "weights (snac_24khz, snac_32khz, snac_44khz, mimi)")
    c.add_argument("--clip-seconds", type=float, default=10.0, help="decode: seconds of codes per offline decode")
    c.add_argument("--push-frames", type=int, default=4, help="decode: finest frames per streaming push")
    c.add_argument("--device", nargs="+", default=None, help="decode: devices to measure (default: cpu, and cuda "
                   "where there is one)")

    c = sub.add_parser("gpu-check", help="on a CUDA machine: the CUDA tests, the snac_24khz preset end to end "
                       "through Snakemake (a killed phase resumed), bench memory, throughput and precision; one "
                       "table, written as JSON (a few minutes on one H100/H200)")
    c.add_argument("--out", default=None, help="the JSON report (default results/gpu-check/gpu-check-<time>.json)")
    c.add_argument("--skip", nargs="+", default=[], metavar="STEP",
                   choices=["end to end", "cuda tests", "bench memory", "throughput", "precision", "discriminators"],
                   help="leave out these steps: 'end to end', 'cuda tests', 'bench memory', throughput, precision, "
                   "discriminators")
    c.add_argument("--cpu", action="store_true",
                   help="run the steps on the CPU at toy sizes: tries the check itself where there is no GPU")

    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.knobs = knobs = {**getattr(a, "settings", {}), **getattr(a, "runtime", {})}     # runtime over settings
    if a.command in GPU_COMMANDS and knobs.get("device", getattr(a, "device", "auto")) != "cpu":
        from .gpus import claim
        claim(knobs.get("nproc_per_node", 1))      # a phase under torchrun: one GPU per process
    _header(a.command)
    try:
        return _run(a) or 0
    except Exception as e:
        msg = error_message(e)
        if msg is None:
            raise                    # a bug: its traceback is what a report needs
        from rich.markup import escape
        from .ui import console
        console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
        return 1


def _header(command: str) -> None:
    """Where a command runs, as its first line (stderr: stdout may carry JSON); in a job's log it
    shows the host, the SLURM job and the GPUs the job was given."""
    import socket
    print(f"pipeline {command} on {socket.gethostname()}: SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID', '-')} "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", file=sys.stderr, flush=True)


# ---- what a user sees when a command fails ----------------------------------------------------
EXPECTED = (OSError, ValueError, RuntimeError)       # bad input, config or environment: one line
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = tuple(os.strerror(n) for n in DISK_FULL) + (
    "unexpected pos",        # torch's zip writer (torch.save) after a short write
    "file write failed",     # the same writer, other torch versions
)
WRITERS = {("torch.serialization", "save"): "f", ("safetensors.torch", "save_file"): "filename",
           ("soundfile", "write"): "file", ("pathlib", "write_text"): "self", ("pathlib", "write_bytes"): "self"}


def error_message(e: BaseException) -> str | None:
    """One line for an expected error, None for anything else (a bug). A full disk, wherever it
    surfaces (an OSError, torch's zip writer, safetensors), becomes 'disk full while writing FILE'."""
    chain = _chain(e)
    if any(isinstance(x, OSError) and x.errno in DISK_FULL for x in chain) or \
            any(t in str(x) for x in chain for t in DISK_FULL_TEXT):
        name = _written_file(chain)
        return f"disk full while writing {name}" if name else f"disk full while writing a file ({_one_line(e)})"
    if isinstance(e, EXPECTED) or type(e).__name__ == "SafetensorError":
        return _one_line(e)
    return None


def _one_line(e) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _chain(e) -> list:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _written_file(chain) -> str | None:
    """The file a failed write was writing: an OSError's filename, else (innermost frame first) an
    open-for-writing file object, or the path argument of a known writer (torch.save, ...)."""
    for x in chain:
        if isinstance(x, OSError) and x.filename:
            return os.fspath(x.filename)
    for x in chain:
        for frame, _ in reversed(list(traceback.walk_tb(x.__traceback__))):
            for v in frame.f_locals.values():
                name = getattr(v, "name", None)
                if isinstance(v, io.IOBase) and isinstance(name, str) and not name.startswith("<") \
                        and set(str(getattr(v, "mode", ""))) & set("wax+"):
                    return name
            arg = WRITERS.get((frame.f_globals.get("__name__"), frame.f_code.co_name))
            v = frame.f_locals.get(arg) if arg else None
            if isinstance(v, (str, os.PathLike)):
                return os.fspath(v)
    return None


def _run(a) -> int | None:
    if a.command == "demo-data":
        from .data.demo import generate_demo
        print(json.dumps(generate_demo(a.out, **a.settings)))
    elif a.command == "demo-codec":
        from .training.democodec import train_demo_codec
        train_demo_codec(a.manifest, a.out, a.settings, a.device)
    elif a.command == "make-manifest":
        from .data.folder import make_manifest
        make_manifest(a.audio_dir, a.out_dir, a.speaker_depth, a.heldout_fraction, a.seed, a.workers)
    elif a.command == "precompute-shard":
        from .data.precompute import run_shard, settings_with_defaults
        from .gpus import pick_device
        from .model import codecs
        s = settings_with_defaults(a.knobs)            # a bad setting fails before the codec loads
        run_shard(a.manifest, a.shard, a.n_shards, codecs.load(a.codec, s["n_q"], pick_device(s["device"])), a.out, s)
    elif a.command == "precompute-summary":
        from .data.precompute import summarize
        summarize(a.manifest, a.shards, a.out_dir)
    elif a.command == "cache-info":
        return _cache_info(a)
    elif a.command == "config-diff":
        from .configdiff import diff, load_config, show
        base = load_config(a.config)
        result = diff(base, load_config(a.config[:1] + [a.against]) if a.against else None)
        if a.json:
            print(json.dumps(result, indent=2))
        else:
            show(result, a.against or "settings shared by all phases", a.all)
    elif a.command == "convert-snac":
        from .model.codecs import family
        r = family("snac").convert_official(a.src, a.dst)
        print(f"converted {r['tensors']} tensors, verified one by one (sha256 {r['digest'][:12]}) -> {r['out']}")
    elif a.command == "train":
        from .training.distributed import launch_command
        from .training.guards import Stopped
        from .training.train import train
        s = dict(a.knobs)
        launch = launch_command(a.argv, s.get("nproc_per_node", 1), s.get("nnodes", 1))
        if launch:                       # this phase runs as several processes: torchrun starts them
            import subprocess
            return subprocess.call(launch)
        if a.init_checkpoint:
            s["init_checkpoint"] = a.init_checkpoint
        if a.no_resume:
            s["resume"] = False
        try:
            train(a.phase, s, a.codec, a.cache, a.heldout, a.init, a.out, target_rate=a.target_rate,
                  resume_from=a.resume_from, adapter=a.adapter, metrics=a.metrics)
        except Stopped as e:
            from .ui import console
            console.print(f"[bold yellow]stopped:[/] {e}")
            return e.code
    elif a.command == "export":
        from .model.codecs import export_final
        export_final(a.phase_dir, a.out)
    elif a.command == "evaluate":
        from .evaluation.evaluate import evaluate
        evaluate(a.codec, a.heldout, dict(m.split("=", 1) for m in a.model), a.out, a.knobs,
                 a.target_rate)
    elif a.command == "report":
        from .evaluation.report import write_report_items
        for p in write_report_items(a.eval, dict(m.split("=", 1) for m in a.phase), a.out_dir, a.clips):
            print(p)
    elif a.command in ("resynth", "decode"):
        from .evaluation import infer
        chunk = {} if a.chunk_seconds is None else {"chunk_seconds": a.chunk_seconds}
        if a.command == "resynth":
            infer.resynth(a.model, a.input, a.output, a.device, a.lora, **chunk)
        else:
            infer.decode(a.model, a.codes, a.output, a.device, lora=a.lora, **chunk)
    elif a.command == "gpu-check":
        from .gpucheck import main as gpu_check
        return gpu_check(a.out, a.cpu, a.skip)
    elif a.command == "bench":
        from . import bench
        if a.what == "memory":
            bench.memory(a.configfile)
        elif a.what == "dag":
            bench.dag(a.rows, a.shards, a.rounds, a.keep)
        elif a.what == "decode":
            bench.decode(a.model, a.preset, a.clip_seconds, a.rounds, a.push_frames, devices=a.device)
        elif a.what == "train" and a.nproc_per_node:
            bench.processes(a.nproc_per_node)
        elif a.what == "train":
            bench.train(a.cache_hours, a.workers, a.segment_seconds)
        elif a.what in ("throughput", "precision", "discriminators"):
            getattr(bench, a.what)(a.configfile, steps=a.steps, rounds=a.rounds, cache_hours=a.cache_hours,
                                   only=a.phases)
        else:
            getattr(bench, a.what)(a.seconds)


def _cache_info(a) -> int:
    from .data.cache import CacheError, cache_info
    from .ui import console
    try:
        codec = None
        if a.check and a.codec:
            from .data.cache import shard_paths
            from .data.manifest import n_q_of
            from .model import codecs
            codec = codecs.load(a.codec, n_q_of(shard_paths(a.cache)))      # the codec as the cache used it
        info = cache_info(a.cache, a.check, codec, None if a.json else console.print)
    except CacheError as e:
        console.print(f"[bold red]cache error:[/] {e}")
        return 2
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        from rich.table import Table
        t = Table(title=f"cache {a.cache}")
        cols = ("shard", "utterances", "seconds", "bandlimited", "rejects", "digest") + (("check",) if a.check else ())
        for col in cols:
            t.add_column(col, justify="right")
        for s in info["shards"]:
            t.add_row(s["path"], str(s["utterances"]), f"{s['seconds']:.1f}", str(s["bandlimited"]),
                      str(s["rejects"]), s["digest"][:12], *(("[green]ok" if s["ok"] else "[bold red]FAIL",) if a.check else ()))
        t.add_row("[b]total", f"[b]{info['utterances']}", f"[b]{info['seconds']:.1f}", "", "", "")
        console.print(t)
        console.print_json(data=info["fingerprint"])
        for s in info["shards"]:
            if "alignment" in s:
                r = s["alignment"]
                console.print(f"{s['path']}: alignment {r['checks']} checks, slicing {'ok' if r['slicing_ok'] else 'WRONG'}, "
                              f"re-encode agreement {r['reencode_match']:.3f} over {r['reencode_compared']} codes, decode max err {r['decode_max_err']:.2e}")
        if "note" in info:
            console.print(f"note: {info['note']}")
        for problem in info["problems"]:
            console.print(f"[bold red]damaged:[/] {problem}")
    return 2 if info["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
