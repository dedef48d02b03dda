"""`python -m pipeline <command>`: the program every Snakemake rule runs."""
from __future__ import annotations

import argparse
import json
import sys


def _json(s: str) -> dict:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("demo-data", help="generate the deterministic demo corpus")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})

    c = sub.add_parser("demo-codec", help="build and briefly train the tiny demo SNAC")
    c.add_argument("--manifest", required=True, nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, required=True)

    c = sub.add_parser("precompute-shard", help="encode one shard of a manifest into the zarr cache")
    c.add_argument("--manifest", required=True, nargs="+", help="one or more manifests, in config order")
    c.add_argument("--shard", type=int, required=True)
    c.add_argument("--n-shards", type=int, required=True)
    c.add_argument("--codec", required=True, help="codec folder (config.json + weights)")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})

    c = sub.add_parser("precompute-summary", help="rejects.jsonl + summary.json for a manifest")
    c.add_argument("--manifest", required=True, nargs="+")
    c.add_argument("--out-dir", required=True)
    c.add_argument("shards", nargs="+")

    c = sub.add_parser("cache-info", help="shards, utterances, seconds and fingerprint of a cache")
    c.add_argument("cache")
    c.add_argument("--json", action="store_true")

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
    c.add_argument("--settings", type=_json, required=True)
    c.add_argument("--codec", required=True)
    c.add_argument("--cache", nargs="+", required=True, help="training cache shards")
    c.add_argument("--heldout", nargs="+", required=True, help="held-out cache shards")
    c.add_argument("--init", default=None, help="previous phase's output folder")
    c.add_argument("--out", required=True, help="phase folder")
    c.add_argument("--init-checkpoint", default=None,
                   help="warm restart from these weights (fresh optimizer and schedule, step 0)")
    c.add_argument("--resume-from", default=None, help="exact resume from this step checkpoint of the same run")
    c.add_argument("--no-resume", action="store_true", help="ignore this run's step checkpoints")
    c.add_argument("--adapter", default="default", help="LoRA adapter name (lora phase)")

    c = sub.add_parser("export", help="merge LoRA and write final.pt + model.safetensors + config.json")
    c.add_argument("--phase-dir", required=True)
    c.add_argument("--out", required=True)

    c = sub.add_parser("evaluate", help="metrics on the held-out cache -> eval.json")
    c.add_argument("--codec", required=True)
    c.add_argument("--heldout", nargs="+", required=True)
    c.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    c.add_argument("--out", required=True)
    c.add_argument("--settings", type=_json, default={})

    c = sub.add_parser("resynth", help="any audio file in, 48 kHz out through the new decoder")
    c.add_argument("--model", required=True)
    c.add_argument("--lora", default=None, help="a lora_weights.safetensors to apply at inference")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--device", default="auto")

    c = sub.add_parser("decode", help="decode codes (.npz, one int array per codebook) to audio")
    c.add_argument("--model", required=True)
    c.add_argument("codes")
    c.add_argument("output")
    c.add_argument("--device", default="auto")

    c = sub.add_parser("bench", help="print throughput figures")
    c.add_argument("what", choices=["precompute", "train", "dag"])
    c.add_argument("--seconds", type=float, default=20.0, help="audio seconds per measurement")
    c.add_argument("--rows", type=int, default=100_000, help="dag: manifest lines")
    c.add_argument("--shards", type=int, default=64, help="dag: precompute.shards")
    c.add_argument("--rounds", type=int, default=3, help="dag: repetitions of each measurement")
    c.add_argument("--keep", default=None, help="dag: build the synthetic tree in this folder and keep it")

    a = p.parse_args(argv)
    try:
        return _run(a) or 0
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        from .ui import console
        console.print(f"[bold red]error:[/] {e}")
        return 1


def _run(a) -> int | None:
    if a.command == "demo-data":
        from .data.demo import generate_demo
        print(json.dumps(generate_demo(a.out, **a.settings)))
    elif a.command == "demo-codec":
        from .model.democodec import train_demo_codec
        train_demo_codec(a.manifest, a.out, a.settings)
    elif a.command == "precompute-shard":
        from .data.precompute import run_shard
        run_shard(a.manifest, a.shard, a.n_shards, a.codec, a.out, a.settings)
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
        from .model.codec import convert_official
        r = convert_official(a.src, a.dst)
        print(f"converted {r['tensors']} tensors, verified one by one (sha256 {r['digest'][:12]}) -> {r['out']}")
    elif a.command == "train":
        from .training.train import train
        s = dict(a.settings)
        if a.init_checkpoint:
            s["init_checkpoint"] = a.init_checkpoint
        if a.no_resume:
            s["resume"] = False
        train(a.phase, s, a.codec, a.cache, a.heldout, a.init, a.out, a.resume_from, a.adapter)
    elif a.command == "export":
        from .model.snac48 import export_final
        export_final(a.phase_dir, a.out)
    elif a.command == "evaluate":
        from .evaluation.evaluate import evaluate
        evaluate(a.codec, a.heldout, dict(m.split("=", 1) for m in a.model), a.out, a.settings)
    elif a.command in ("resynth", "decode"):
        from .evaluation import infer
        if a.command == "resynth":
            infer.resynth(a.model, a.input, a.output, a.device, a.lora)
        else:
            infer.decode(a.model, a.codes, a.output, a.device)
    elif a.command == "bench":
        from . import bench
        if a.what == "dag":
            bench.dag(a.rows, a.shards, a.rounds, a.keep)
        else:
            getattr(bench, a.what)(a.seconds)


def _cache_info(a) -> int:
    from .data.cache import CacheError, cache_info
    from .ui import console
    try:
        info = cache_info(a.cache)
    except CacheError as e:
        console.print(f"[bold red]cache error:[/] {e}")
        return 2
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table
    t = Table(title=f"cache {a.cache}")
    for col in ("shard", "utterances", "seconds", "bandlimited", "rejects"):
        t.add_column(col, justify="right")
    for s in info["shards"]:
        t.add_row(s["path"], str(s["utterances"]), f"{s['seconds']:.1f}", str(s["bandlimited"]),
                  str(s["rejects"]))
    t.add_row("[b]total", f"[b]{info['utterances']}", f"[b]{info['seconds']:.1f}", "", "")
    console.print(t)
    console.print_json(data=info["fingerprint"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
