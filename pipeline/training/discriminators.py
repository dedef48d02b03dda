"""Adversarial fine-tuning: discriminators, their losses, and `Adversarial`, the one object the
trainer drives.

Discriminators (DAC's pair, sized by the config):
  * `PeriodDiscriminator` (HiFi-GAN's multi-period discriminator): the waveform folded into
    (T/p, p) and read by strided (5, 1) convolutions, one per period in `periods`;
  * `BandSTFTDiscriminator` (DAC's multi-band complex-STFT discriminator), one per size in
    `stft_n_ffts`: real and imaginary STFT parts as two channels, split along frequency into
    bands, each band with its own conv stack *and its own logits*, so the new band (codec Nyquist
    to target Nyquist) has a critic of its own. `band_edges` are the interior edges of the codec
    band in fractions of the codec Nyquist; the new band is always one band of its own; every
    edge comes from the geometry (`band_bins`).

Losses, in DAC's accounting (so DAC's lambdas mean the same here): per sub-discriminator (one
period, one STFT size; the mean over all of its logits, every band's), least squares
(D: (1 - D(real))^2 + D(fake)^2, G: (1 - D(fake))^2) or hinge (D: relu(1 - D(real)) +
relu(1 + D(fake)), G: relu(1 - D(fake)), as Vocos), summed over sub-discriminators; feature
matching: the mean |f(fake) - f(real)| of every feature map, summed. The generator gets
lambdas.adversarial * adversarial + lambdas.feature_matching * feature_matching. Everything runs
in fp32 with autocast off. `adv/*_new_band` terms (the new band's critics alone) are logged, not
added.

Windows (`crop_seconds`): the discriminators may see one window of each segment instead of all of
it, at a place drawn uniformly within the item's real samples (DAC trains its discriminators on
0.38 s excerpts, HiFi-GAN on 0.37 s). Their cost (most of `full`'s step on a GPU) falls in
proportion; their losses are means, so the lambdas keep their meaning. Where a window starts is a
pure function of (seed, step, micro-batch, process), so a resumed run draws the same windows.

Padding: with a mask (BoolTensor (B, 1, T), True on real samples), the padded samples of real and
fake are zeroed before any discriminator. They then differ nowhere and pass no gradient to the
generator; the discriminators still see those frames (as silence, identical in real and fake),
which only dilutes the means by the padded fraction.

The trainer's step (the discriminator learns on the detached prediction, then scores it):

    adv = Adversarial(s["adversarial"], model.geometry, seed=s["seed"]).to(device)
    pred = model.decode(codes); loss, terms = loss_fn(pred.float(), target)
    if adv.active(step):
        seen = adv.crop(target, pred, mask, lengths, key=(step, micro_batch, rank))
        terms |= adv.discriminator_step(*seen)
        g, g_terms = adv.generator_loss(*seen)
        loss, terms = loss + g, terms | g_terms
    ... loss.backward(); clip; opt.step()
    step checkpoints: torch.save(adv.state_dict(), ...); adv.load_state_dict(torch.load(..., weights_only=True))
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .spectral import band_bins, reflect_pad, stft

KEYS = ("enabled", "start_step", "loss", "periods", "period_channels", "stft_n_ffts", "stft_channels",
        "band_edges", "crop_seconds", "lambdas", "lr", "betas", "weight_decay", "lr_decay", "grad_clip")
LOSSES = ("least_squares", "hinge")


def wn_conv2d(*args, **kwargs):
    return weight_norm(nn.Conv2d(*args, **kwargs))


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: list):
        super().__init__()
        self.period, dims = period, [1, *channels]
        self.convs = nn.ModuleList(wn_conv2d(a, b, (5, 1), (3 if i < len(channels) - 1 else 1, 1), padding=(2, 0))
                                   for i, (a, b) in enumerate(zip(dims, dims[1:])))
        self.post = wn_conv2d(dims[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x):
        """(B, 1, T) -> (feature maps, [logits])"""
        x = reflect_pad(x, 0, -x.shape[-1] % self.period)
        x = x.view(x.shape[0], 1, -1, self.period)
        fmaps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            fmaps.append(x)
        return fmaps, [self.post(x)]


class BandSTFTDiscriminator(nn.Module):
    def __init__(self, n_fft: int, bins: list, channels: int):
        super().__init__()
        self.n_fft, self.bins = n_fft, bins
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

        def stack():
            return nn.ModuleList([wn_conv2d(2, channels, (3, 9), padding=(1, 4)),
                                  *(wn_conv2d(channels, channels, (3, 9), (1, 2), padding=(1, 4)) for _ in range(3)),
                                  wn_conv2d(channels, channels, (3, 3), padding=(1, 1))])
        self.stacks = nn.ModuleList(stack() for _ in bins)
        self.posts = nn.ModuleList(wn_conv2d(channels, 1, (3, 3), padding=(1, 1)) for _ in bins)

    def forward(self, x):
        """(B, 1, T) -> (feature maps, [logits per band]); the last band is the new one."""
        spec = stft(x[:, 0], self.n_fft, self.n_fft // 4, self.window)
        spec = torch.view_as_real(spec).permute(0, 3, 2, 1)          # (B, re/im, frames, bins)
        fmaps, logits = [], []
        for (lo, hi), stack, post in zip(self.bins, self.stacks, self.posts):
            h = spec[..., lo:hi]
            for conv in stack:
                h = F.leaky_relu(conv(h), 0.1)
                fmaps.append(h)
            logits.append(post(h))
        return fmaps, logits


class Discriminators(nn.Module):
    def __init__(self, s: dict, geometry):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, s["period_channels"]) for p in s["periods"])
        self.stfts = nn.ModuleList(BandSTFTDiscriminator(n, band_bins(n, geometry, s["band_edges"]), s["stft_channels"])
                                   for n in s["stft_n_ffts"])

    def forward(self, x):
        """-> [(feature maps, logits)] per sub-discriminator: periods first, then STFT sizes."""
        return [d(x) for d in (*self.periods, *self.stfts)]


def flat(logits: list) -> torch.Tensor:
    return torch.cat([l.flatten(1) for l in logits], 1)


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return (1 - real).square().mean() + fake.square().mean()


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - fake).mean() if kind == "hinge" else (1 - fake).square().mean()


class Adversarial:
    """Discriminators, their optimizer (AdamW) and scheduler (exponential decay per step), and
    the generator's adversarial loss, from a phase's `adversarial` settings (every key of the
    schema's block; its defaults live there) and the model's geometry. The discriminators are
    initialised from `seed` without touching the global RNG, so that enabling them changes
    nothing before `start_step`."""
    # whether the discriminators' step scores real and fake in one pass over both: no faster on 2
    # CPU cores (0.96x and 0.99x in two runs of bench discriminators); a lever for the GPU to measure
    joint = False

    def __init__(self, settings: dict, geometry, seed: int = 0):
        s = dict(settings)
        if set(s) != set(KEYS):
            raise ValueError(f"adversarial settings: unknown keys {sorted(set(s) - set(KEYS))}, "
                             f"missing {sorted(set(KEYS) - set(s))}")
        if s["loss"] not in LOSSES:
            raise ValueError(f"adversarial.loss must be one of {LOSSES}, got {s['loss']!r}")
        if not s["periods"] and not s["stft_n_ffts"]:
            raise ValueError("adversarial: no discriminator (periods and stft_n_ffts are both empty)")
        if list(s["band_edges"]) != sorted(set(s["band_edges"])) or not all(0 < e < 1 for e in s["band_edges"]):
            raise ValueError(f"adversarial.band_edges must ascend strictly within (0, 1), got {s['band_edges']}")
        if set(s["lambdas"]) != {"adversarial", "feature_matching"}:
            raise ValueError(f"adversarial.lambdas must be {{adversarial, feature_matching}}, got {s['lambdas']}")
        self.s, self.kind, self.start_step, self.seed = s, s["loss"], int(s["start_step"]), int(seed)
        self.window = None if s["crop_seconds"] is None else round(s["crop_seconds"] * geometry.target_rate)
        if self.window is not None and s["stft_n_ffts"] and self.window < max(s["stft_n_ffts"]):
            raise ValueError(f"adversarial.crop_seconds: a window of {self.window} samples is shorter than the largest "
                             f"of stft_n_ffts {s['stft_n_ffts']}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminator = Discriminators(s, geometry)
        self.params = list(self.discriminator.parameters())
        self.sync = None        # with several processes: averages the discriminators' gradients
        self.opt = torch.optim.AdamW(self.params, lr=s["lr"], betas=tuple(s["betas"]), weight_decay=s["weight_decay"])
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, s["lr_decay"])

    def active(self, step: int) -> bool:
        """Steps count from 1: steps 1..start_step are regression-only."""
        return bool(self.s["enabled"]) and step > self.start_step

    def _inputs(self, real, fake, mask):
        real, fake = real.float(), fake.float()
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != real.shape:
                raise ValueError(f"mask must be a BoolTensor shaped like the audio {tuple(real.shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            real, fake = real.masked_fill(~mask, 0.0), fake.masked_fill(~mask, 0.0)
        return real, fake

    def crop(self, real, fake, mask=None, lengths=None, key=()) -> tuple:
        """(real, fake, mask) as the discriminators see them: with crop_seconds, one window per item,
        the same in real and fake, starting anywhere it fits within the item's `lengths` real
        samples (all of it: the segment), drawn from (seed, *key); without, or when the segment is no
        longer than a window, unchanged."""
        n, length = self.window, real.shape[-1]
        if n is None or n >= length:
            return real, fake, mask
        rng = np.random.default_rng([self.seed, *key])
        starts = [int(rng.integers(0, max(k - n, 0) + 1)) for k in (lengths or [length] * real.shape[0])]

        def take(x):                 # slices: a backward with no atomics (deterministic on CUDA)
            return None if x is None else torch.stack([x[b, ..., o:o + n] for b, o in enumerate(starts)])
        return take(real), take(fake), take(mask)

    def _new_band(self, outs: list) -> list:
        return [logits[-1] for _, logits in outs[len(self.discriminator.periods):]]

    def _both(self, real, fake) -> tuple:
        """The discriminators' outputs for real and for fake: one pass over both batches together
        (each item is scored alone: no layer mixes items), or two with `joint` off."""
        if not self.joint:
            return self.discriminator(real), self.discriminator(fake)
        b, outs = real.shape[0], self.discriminator(torch.cat([real, fake]))
        return ([([f[:b] for f in fm], [l[:b] for l in lg]) for fm, lg in outs],
                [([f[b:] for f in fm], [l[b:] for l in lg]) for fm, lg in outs])

    def discriminator_step(self, real, fake, mask=None, part=(0, 1)) -> dict:
        """The discriminators learn on (real, fake.detach()); -> logged terms. With gradient
        accumulation, part=(i, n) is micro-batch i of n: gradients accumulate and the optimizer
        steps after the last one, so discriminator and generator take one step each."""
        i, n = part
        with torch.autocast(real.device.type, enabled=False):
            real, fake = self._inputs(real, fake.detach(), mask)
            out_r, out_f = self._both(real, fake)
            loss = sum(d_loss(self.kind, flat(r), flat(f)) for (_, r), (_, f) in zip(out_r, out_f))
            new = [d_loss(self.kind, r, f) for r, f in zip(self._new_band(out_r), self._new_band(out_f))]
            if i == 0:
                self.opt.zero_grad(set_to_none=True)
            (loss / n).backward()
        terms = {"adv/d_loss": loss.detach()}
        if new:
            terms["adv/d_new_band"] = (sum(new) / len(new)).detach()
        if i == n - 1:
            if self.sync:
                self.sync(self.params)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.s["grad_clip"] or math.inf)
            if torch.isfinite(norm):            # a non-finite step would poison the discriminators
                self.opt.step()
            self.sched.step()
            terms.update({"adv/d_grad_norm": norm.detach(), "adv/d_lr": self.sched.get_last_lr()[0]})
        return terms

    def generator_loss(self, real, fake, mask=None):
        """-> (lambda-weighted adversarial + feature-matching loss, logged terms). Gradients reach
        `fake` only; the discriminators' parameters get none."""
        for p in self.params:
            p.requires_grad_(False)
        try:
            with torch.autocast(fake.device.type, enabled=False):
                real, fake = self._inputs(real.detach(), fake, mask)
                with torch.no_grad():
                    out_r = self.discriminator(real)
                out_f = self.discriminator(fake)
                adv = sum(g_loss(self.kind, flat(f)) for _, f in out_f)
                fm = sum(F.l1_loss(a, b) for (fa, _), (fb, _) in zip(out_f, out_r) for a, b in zip(fa, fb))
                new = [g_loss(self.kind, f) for f in self._new_band(out_f)]
                lam = self.s["lambdas"]
                total = lam["adversarial"] * adv + lam["feature_matching"] * fm
        finally:
            for p in self.params:
                p.requires_grad_(True)
        terms = {"adv/g_adversarial": adv.detach(), "adv/g_feature_matching": fm.detach()}
        if new:
            terms["adv/g_new_band"] = (sum(new) / len(new)).detach()
        return total, terms

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def to(self, device) -> "Adversarial":
        self.discriminator.to(device)
        for st in self.opt.state.values():          # Adam's moments follow; its step count stays on CPU
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to(device)
        return self
