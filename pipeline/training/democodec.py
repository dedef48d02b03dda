"""The demo codec: a tiny SNAC built from a config with a fixed seed and trained briefly on the
demo corpus at its own rate, so that the demo's codes really describe the audio.

Losses: waveform/STFT/mel reconstruction plus the quantizer's codebook and commitment losses
(VQ-VAE style, computed per residual level on the factorised latents SNAC quantises). The
result is an untrained-by-any-real-standard codec: it shows the mechanics, not quality.

Training excerpts are salient, as descript-audio-codec draws them: an excerpt quieter than
`salient_db` (its RMS in dBFS) is drawn again, up to `SALIENT_TRIES` times. Real recordings open
and close with pauses (a read-speech corpus: about a second at each end of a 3.7 s clip); drawn
uniformly, half the excerpts of such a corpus are silence, and a codec trained on them learns to
answer every excerpt quietly (measured on real 48 kHz speech, BENCHMARKS.md: 30 dB too quiet).

The demo codec is a SNAC by definition: it trains the encoder and quantizer too, through the two
helpers the seam's Snac gives for that (model/codecs/snac.py: encode_with_losses,
decode_quantized, reset_dead_codes), and never touches SNAC's modules itself.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data import audio as A
from ..data.cache import dump_json
from ..data.manifest import parse_manifest
from ..gpus import pick_device
from ..model import codecs
from ..settings import DEMO_CODEC_DEFAULTS
from ..ui import console
from .losses import ReconstructionLoss
from .metrics import evaluate_pair

# codec.demo's defaults (the schema's), and the quantizer's loss weights (VQ-VAE's), which no config sets
DEFAULTS = {**DEMO_CODEC_DEFAULTS, "codebook_weight": 1.0, "commitment_weight": 0.25}
SALIENT_TRIES = 8


def load_corpus(manifest, rate: int) -> list:
    out = []
    for row in parse_manifest(manifest).rows:
        try:
            x, sr = A.read_mono(row.audio)
        except A.AudioError:
            continue
        out.append(A.resample(x, sr, rate))
    if not out:
        raise RuntimeError(f"{manifest}: no readable audio to train the demo codec on")
    return out


def excerpt(clips, n: int, rng, salient_db: float | None) -> np.ndarray:
    """A random excerpt of up to n samples, drawn again (up to SALIENT_TRIES times in all) while
    its RMS is below salient_db dBFS; the last draw is kept. None: the first draw."""
    for _ in range(SALIENT_TRIES):
        c = clips[rng.integers(len(clips))]
        o = int(rng.integers(0, max(1, len(c) - n)))
        piece = c[o:o + n]
        if salient_db is None or np.mean(np.square(piece, dtype=np.float64)) >= 10 ** (salient_db / 10):
            break
    return piece


def train_demo_codec(manifest, out, settings: dict, device: str = "auto") -> dict:
    """Train the demo codec on `device` (auto: CUDA when there is one; not a setting: where it
    trains never reruns anything, though a GPU's codec is not the CPU's to the bit)."""
    s = {**DEFAULTS, **settings}
    if not s["config"]:
        raise ValueError("codec.demo.config: the demo SNAC's constructor arguments are required")
    torch.manual_seed(s["seed"])
    rng = np.random.default_rng(s["seed"])
    model = codecs.build(s["config"], s["seed"])     # a SNAC: codec.demo.config is its constructor's
    geo = model.geometry_at(model.sampling_rate)
    clips = load_corpus(manifest, geo.codec_rate)
    seg = max(1, round(s["segment_seconds"] * geo.codec_rate / geo.pad_to)) * geo.pad_to
    loss_fn = ReconstructionLoss(geo.codec_rate, s["lambdas"], n_ffts=(256, 512, 1024), n_mels=64)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=s["steps"], pct_start=0.1)
    untrained = measure_quality(model.eval(), clips[:16])
    device = pick_device(device)
    model.to(device)
    loss_fn.to(device)
    usage = [torch.zeros(geo.codebook_size, dtype=torch.long, device=device) for _ in geo.strides]
    model.train()
    t0 = time.time()
    for step in range(1, s["steps"] + 1):
        batch = np.zeros((s["batch_size"], seg), dtype=np.float32)
        for j in range(s["batch_size"]):
            piece = excerpt(clips, seg, rng, s["salient_db"])
            batch[j, :len(piece)] = piece
        x = torch.from_numpy(batch)[:, None].to(device)
        seen = []
        z_q, cb, commit = model.encode_with_losses(x, seen)
        for u, (idx, _) in zip(usage, seen):
            u += torch.bincount(idx.flatten(), minlength=len(u))
        if step % s["reset_every"] == 0 and step <= 0.8 * s["steps"]:
            model.reset_dead_codes(usage, [z for _, z in seen], rng)
        recon, terms = loss_fn(model.decode_quantized(z_q), x)
        loss = recon + s["codebook_weight"] * cb + s["commitment_weight"] * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == s["steps"]:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in terms.items())
            console.print(f"demo codec step {step}/{s['steps']} loss={loss.item():.3f} {parts} "
                          f"vq={cb.item():.4f}/{commit.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval().cpu()
    quality = measure_quality(model, clips[:16])
    quality.update({"untrained": untrained, "steps": s["steps"], "train_seconds": round(time.time() - t0, 1),
                    "device": str(device),
                    "note": "demo codec: tiny and briefly trained; shows mechanics, not quality"})
    out = Path(out)
    model.save(out)
    dump_json(quality, out / "quality.json")
    keys = ("mel_l1", "lsd_db", "si_sdr_db")
    console.print("demo codec reconstruction at its rate, first clips of the corpus, noise off: "
                  + ", ".join(f"{k} {quality[k]:.3f} (untrained {untrained[k]:.3f})" for k in keys)
                  + f"; code usage {quality['code_usage']}")
    return quality


@torch.inference_mode()
def measure_quality(model, clips) -> dict:
    """Reconstruction metrics of encode -> decode at the codec rate, noise blocks off."""
    rate = model.sampling_rate
    results, used = [], [set() for _ in model.geometry_at(rate).strides]
    with model.noise_disabled():
        for c in clips:
            x = torch.from_numpy(c)[None, None]
            codes = model.encode(x)
            y = model.decode(codes)[..., :x.shape[-1]]
            results.append(evaluate_pair(y, x, rate, rate / 4, n_ffts=(256, 512, 1024)))
            for u, cd in zip(used, codes):
                u.update(cd.flatten().tolist())
    q = {k: round(float(np.mean([r[k] for r in results])), 4) for k in results[0]}
    q["code_usage"] = [round(len(u) / model.geometry_at(rate).codebook_size, 3) for u in used]
    return q
