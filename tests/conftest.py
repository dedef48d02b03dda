"""Shared fixtures: tiny SNAC codecs saved in the official layout, audio files, manifests."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One intra-op thread: the tests' models are tiny, so a second OpenMP thread only adds its barriers,
# and on a shared 2-core machine a thread that spins at a barrier while the other core is busy
# elsewhere stalls every op (tests/test_trainer_runs.py: 370 s of calls with 2 threads, 134 s with 1,
# same load). Subprocesses (CLI commands, torchrun workers) inherit it; Snakemake rules set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# snac_24khz's time geometry (hop 512, strides 4/2/1) at toy width: fast, but aligned like the real one
TINY_24K = dict(sampling_rate=24000, encoder_dim=4, encoder_rates=[2, 4, 8, 8], decoder_dim=32,
                decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=64, codebook_dim=4,
                vq_strides=[4, 2, 1], noise=True, depthwise=True)


# fixtures that run the demo DAG through Snakemake (minutes): a test that uses one is `slow`
END_TO_END = {"built", "copy_of", "slurm_built"}


# Mimi's time geometry (24 kHz, upsampling ratios [8, 6, 5, 4], 12.5 Hz frames, the 250-step sliding
# window) at toy width; layer scales 1 (Mimi's init is 0.01), so the transformers' long reach shows
# in the outputs (a stream with too little left context then differs by far more than 1e-4)
TINY_MIMI = dict(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8, codebook_size=64, codebook_dim=8,
                 vector_quantization_hidden_dimension=8, num_quantizers=6, upsample_groups=16,
                 layer_scale_initial_scale=1.0)


@pytest.fixture(scope="session")
def mimi_dir(tmp_path_factory):
    """A tiny Mimi saved by transformers' save_pretrained; codebooks random (transformers
    initialises them to zeros: every latent would get code 0)."""
    import torch
    import transformers
    config = transformers.MimiConfig(**TINY_MIMI)
    assert config.upsampling_ratios == [8, 6, 5, 4] and config.frame_rate == 12.5 and config.sliding_window == 250
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.MimiModel(config).eval()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("embed_sum"):
                    buf.normal_()
    folder = tmp_path_factory.mktemp("mimi")
    model.save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests that use an END_TO_END fixture are marked `slow` (`pytest -m "not slow"`: the quick
    run; the others long enough to be slow say so themselves). Tests marked `cuda` skip where there
    is no CUDA device (`python -m pipeline gpu-check` runs them on a GPU machine)."""
    import torch
    for item in items:
        if END_TO_END & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The whole demo DAG (rule all, which includes results/phase11/final.pt) built once, locally,
    with tests/workflow_util.py's FAST config: tests/test_workflow.py works on it and on copies of
    it, tests/test_slurm.py compares the same demo run through SLURM with it."""
    from workflow_util import make_tree, snakemake
    root = make_tree(tmp_path_factory.mktemp("wf") / "tree")
    r = snakemake(root, timeout=1500)
    assert r.rc == 0, r.out[-6000:]
    return root, r


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory):
    """A tiny SNAC saved as the official checkpoint layout (config.json + pytorch_model.bin)."""
    d = tmp_path_factory.mktemp("codec")
    tiny_codec(seed=7).save(d, official=True)
    return d


def tiny_codec(seed=7, config=TINY_24K):
    """A random tiny SNAC whose codebooks are seeded from its own latents of speech-like audio,
    so its codes are informative (a random SNAC maps almost everything to one code)."""
    import torch
    from pipeline.model import codecs
    model = codecs.build(config, seed=seed)
    rate = config["sampling_rate"]
    from pipeline.model.codecs.snac import geometry
    n = geometry(config, 2 * rate).pad_to * 8
    x = torch.from_numpy(np.stack([speechlike(max(2.0, n / rate + 0.01), rate, seed=s)[:n] for s in range(4)]))[:, None]
    # the dead-code reset jitters with the global RNG: seeded here, so the codec does not depend on
    # which tests ran before (a near-tie code then flipped between chunked and whole encodes)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seen = []
        model.encode_with_losses(x, seen)
        usage = [torch.zeros(config["codebook_size"], dtype=torch.long) for _ in seen]
        model.reset_dead_codes(usage, [z for _, z in seen], np.random.default_rng(seed))
    return model.eval()


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Harmonics with a gliding f0 plus a noise burst: something with structure at every rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    x += rng.standard_normal(len(t)) * (np.abs(np.sin(2 * np.pi * 1.3 * t)) > 0.8) * 0.5
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write_audio(path, x, rate, **kw):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, rate, **kw)
    return path


def write_manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ---- a small cache from the demo corpus -------------------------------------------------------
@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    from pipeline.data.demo import generate_demo
    from pipeline.data.precompute import run_shard
    from pipeline.model import codecs
    d = tmp_path_factory.mktemp("train")
    generate_demo(d / "demo", seed=5, n_train=6, n_heldout=3, min_seconds=1.2, max_seconds=2.0)
    tiny_codec().save(d / "codec")
    for name, m, n in (("cache", "manifest.jsonl", 2), ("heldout", "heldout.jsonl", 1)):
        for k in range(n):
            run_shard(d / "demo" / m, k, n, codecs.load(d / "codec"), d / name / f"shard-{k:03d}.zarr")
    return d


def settings(**over):
    """A phase's settings for the trainer, complete and checked as pipeline.settings makes them."""
    from pipeline.settings import TRAIN_DEFAULTS, complete, merge
    base = {"steps": 8, "batch_size": 2, "segment_seconds": 0.25, "warmup_steps": 2, "val_every": 4,
            "val_batches": 1, "ckpt_every": 2, "keep_best": 1, "log_every": 2, "n_ffts": [256, 512],
            "n_mels": 40, "num_workers": 0, "lr": 1e-3,
            "groups": [{"pattern": "decoder.new_block", "trainable": True, "lr_factor": 1.0}]}
    return complete(merge(merge(TRAIN_DEFAULTS, base), over), "test")


def run(d, phase, s, out, init=None, **kw):
    from pipeline.training import train as T
    shards = sorted(str(p) for p in (d / "cache").glob("shard-*.zarr"))
    held = sorted(str(p) for p in (d / "heldout").glob("shard-*.zarr"))
    return T.train(phase, s, d / "codec", shards, held, init, out, target_rate=48000, **kw)
