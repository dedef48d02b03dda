"""The 48 kHz model: the frozen SNAC encoder and quantizer, and SNAC's decoder with one new
upsampling DecoderBlock inserted between its last block and its output head (Snake, conv, tanh).

Parameter names of everything pretrained are SNAC's own (`decoder.model.N...`), so pretrained
weights load by name; the new block is `decoder.new_block`.

Smart init (the default) makes the new model start as "the 24 kHz output, upsampled":
  * new_block Snake: alpha = SNAKE_ALPHA (tiny), so snake(x) = x + sin^2(a x)/a ~ x + a x^2 ~ x;
  * new_block ConvTranspose1d (kernel 2r, stride r): per-channel sample-and-hold, so output
    samples r*m .. r*m+r-1 equal input sample m (target sample j sits at codec time j/r);
  * new_block NoiseBlock: the pretrained last block's noise projection (same channels);
  * new_block ResidualUnits: copies of the pretrained last block's residual units (same
    channels and dilations), with the weight-norm gain of each unit's output conv scaled by
    RESIDUAL_GAIN (weight and bias) so the block starts near identity but keeps the learned
    feature detectors. Both are 1e-4, not 1e-2: a trained decoder's head cancels large features
    into a small output (the demo codec trained on real speech: features at -4 dB, output at
    -50 dBFS), so what the block adds to its input reaches the output amplified. Measured on that
    codec, the 48 kHz output against the exact hold of its 24 kHz output: 1.8 dB SNR with 1e-2
    (a DC offset from a x^2, noise in pauses), 41.6 dB with 1e-4 (tests/test_train.py);
  * the output head: an undilated conv whose step-0 output is the 24 kHz output upsampled by a
    chosen interpolator (`interpolator`; at r = 2):
      - cubic (the default): Keys' cubic (a = -1/2), taps [-1, 0, 9, 16, 9, 0, -1] / 16 on the
        zero-stuffed codec-rate output. The held features (above) are a zero-stuffed signal
        convolved with a box of r ones; the cubic kernel, like every interpolator that
        reproduces constants, vanishes at the box's zeros, so it is the box convolved with a
        quotient q (3r taps), and the head is the pretrained taps spread by r (see hold)
        convolved with q: 10r - 1 taps, 19 at r = 2. Its step-0 output is the cubic
        interpolation of the 24 kHz output before tanh, exactly;
      - hold: the pretrained 7-tap conv becomes 6r + 1 taps, the pretrained ones with r - 1 zeros
        between them (same weight-norm g, same bias). At step 0 it computes exactly what the
        pretrained conv dilated by r would: it spans the same time at the new rate, and with the
        hold above it sees at every target-rate sample the features it saw at the codec-rate
        one, so the start is the 24 kHz output held for r samples.
    Measured on the demo codec trained on real read speech (BENCHMARKS.md, "Real 48 kHz
    recordings"): the hold mirrors 0-12 kHz into 12-24 kHz 3-14 dB below it (at step 0, the band
    is 20 dB below the whole signal), the cubic kernel 6-40 dB below (30 dB). ViSQOL at step 0,
    15 held-out utterances: 3.17 (hold), 3.44 (cubic), 3.34 for the soxr-upsampled 24 kHz output;
    after the three phases, all 74: 3.12 (hold), 3.37 (cubic), 3.28 (soxr). On the synthetic demo
    (config/config.yaml, 8 held-out demo clips, noise off), the hold start is 12.7 dB SNR (12.6 to
    12.9) against the soxr upsampling of the 24 kHz output, vs -27.6 dB for random init; on the
    tests' tiny codec cubic 20.0, hold 6.9, random -9.9 dB (tests/test_train.py bounds them).
    Unlike a conv dilated by r, whose response is periodic in the codec rate (|H(f)| =
    |H(codec_rate - f)|: mirrored about the codec Nyquist), either head can shape the new band
    on its own once it trains.
(A linear-interpolating upsampler was tried first: learned features alternate in sign from
sample to sample, so interpolated features gave -10 dB; and SNAC's 7-tap head undilated, -14.9 dB.
Hence the interpolation sits in the head, after the last Snake, where everything is linear.)
All writes go to the parameters weight_norm really holds: `module.weight = W` (right_inverse sets
original0 = |W| and original1 = W) or original0 (the norm g) directly; writing into `.weight` in
place would change nothing, as a test shows.
`random` init leaves the new block at PyTorch's default init and keeps SNAC's own 7-tap head,
undilated: the baseline is SNAC's decoder with one more block and nothing chosen for the new rate
(widening the head is part of what smart init chooses).
config.json records the head's taps (`head.kernel_size`: 7 random, 6r + 1 hold, 10r - 1 cubic),
so load_model rebuilds any of them;
models saved with the earlier dilated head (`new_block.head_dilation`) load with spread taps.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from snac import SNAC
from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, WNConv1d
from snac.layers import Snake1d as SnacSnake
from torch import nn
from torch.utils.checkpoint import checkpoint

from .codec import SNAC_KEYS, freeze, geometry, snac_config, state_digest
from .snake import Snake1d, use_snake

FORMAT = "phase11-snac48/1"
SNAKE_ALPHA = 1e-4
RESIDUAL_GAIN = 1e-4
INTERPOLATORS = ("cubic", "hold")
BF16_BELOW = 8


class Decoder48(nn.Module):
    def __init__(self, decoder: nn.Module, rates: list, factor: int, noise: bool, depthwise: bool,
                 head_kernel: int | None = None):
        super().__init__()
        self.model, self.rates = decoder.model, list(rates)
        head = self.model[-2]
        channels = head.in_channels
        self.factor = factor
        if head_kernel is not None and head_kernel != head.kernel_size[0]:   # smart init's wide head
            if head_kernel % 2 == 0:
                raise ValueError(f"head kernel must be odd (centred), got {head_kernel}")
            self.model[-2] = WNConv1d(channels, head.out_channels, head_kernel, padding=head_kernel // 2)
        self.new_block = DecoderBlock(channels, channels, stride=factor, noise=noise,
                                      groups=channels if depthwise else 1)
        self.bf16_layers = 0          # training only: leading layers under bf16 autocast (bf16_split)
        self.checkpointing = False    # training only: recompute the blocks' activations in backward

    def forward(self, x):
        layers = [*self.model[:-3], self.new_block, *self.model[-3:]]
        low = self.bf16_layers if self.training else 0
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low > 0):
            for layer in layers[:low]:
                x = self._run(layer, x)
        x = x.float()
        for layer in layers[low:]:
            x = self._run(layer, x)
        return x

    def _run(self, layer, x):
        if self.checkpointing and self.training and torch.is_grad_enabled() and isinstance(layer, DecoderBlock):
            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def bf16_split(self) -> int:
        """How many leading decoder layers may run in bf16: the input convolutions (and attention)
        and the upsampling blocks whose output is still below codec_rate / BF16_BELOW. The error
        bf16 adds grows with the rate a block runs at: measured on the test codec (hop 512), bf16 up
        to the first block keeps the 48 kHz output at 51 dB SNR against fp32 (50 dB in 12-24 kHz),
        up to the second 43 dB, over the whole pretrained decoder 28 dB (tests/test_trainer_runs.py)."""
        blocks = [i for i, m in enumerate(self.model[:-3]) if isinstance(m, DecoderBlock)]
        n, rate = blocks[0], 1
        for i, r in zip(blocks, self.rates):
            rate *= r
            if rate * BF16_BELOW >= math.prod(self.rates):
                break
            n = i + 1
        return n


class SNAC48(nn.Module):
    """Encoder and quantizer of a SNAC codec (frozen) + Decoder48 at target_rate."""

    def __init__(self, codec_config: dict, target_rate: int, head_kernel: int | None = None):
        """head_kernel: taps of the output conv (None: SNAC's own, 7); smart init widens it."""
        super().__init__()
        codec_config = {k: codec_config[k] for k in SNAC_KEYS if k in codec_config}
        base = SNAC(**codec_config)
        factor = target_rate // codec_config["sampling_rate"]
        if factor * codec_config["sampling_rate"] != target_rate or factor < 2:
            raise ValueError(f"target rate {target_rate} must be an integer multiple (>= 2) of the "
                             f"codec rate {codec_config['sampling_rate']}")
        self.codec_config, self.target_rate = snac_config(base), target_rate
        self.geometry = geometry(self.codec_config, target_rate)
        self.encoder, self.quantizer = base.encoder, base.quantizer
        self.decoder = Decoder48(base.decoder, codec_config["decoder_rates"], factor, codec_config.get("noise", True),
                                 codec_config.get("depthwise", True), head_kernel)
        use_snake(self, SnacSnake)      # no TorchScript in the forward (pipeline/model/snake.py)

    @property
    def config(self) -> dict:
        return {"format": FORMAT, "codec": self.codec_config, "target_rate": self.target_rate,
                "new_block": {"stride": self.decoder.factor},
                "head": {"kernel_size": self.decoder.model[-2].kernel_size[0]}}

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> list:
        """Codec-rate audio (B, 1, T) -> codes, exactly as the frozen SNAC encodes them."""
        pad = -audio.shape[-1] % self.geometry.pad_to     # SNAC.preprocess: right-pad with zeros
        return self.quantizer(self.encoder(torch.nn.functional.pad(audio, (0, pad))))[1]

    def decode(self, codes: list) -> torch.Tensor:
        return self.decoder(self.quantizer.from_codes(codes))

    def frozen_parts(self):
        return [self.encoder, self.quantizer]

    # LoRA at inference: adapters hot-swap on the loaded base (see pipeline.model.lora)
    def load_lora(self, path, adapter: str | None = None):
        """-> (loaded, skipped) keys; warns if the adapter was trained on another base."""
        from . import lora
        return lora.load_lora(self, path, adapter, base_digest=self.base_digest())

    def set_lora_enabled(self, enabled: bool) -> None:
        from . import lora
        lora.set_lora_enabled(self, enabled)

    def set_active_adapter(self, name: str) -> None:
        from . import lora
        lora.set_active_adapter(self, name)

    def unload_lora(self) -> None:
        from . import lora
        lora.unload_lora(self)

    def get_lora_state_dict(self, adapter: str | None = None) -> dict:
        from . import lora
        return lora.lora_state_dict(self, adapter)

    def base_digest(self) -> str:
        """Digest of the weights without adapters (what LoRA files record as their base), the same
        whether adapters are loaded or not: a fused to_qkv that LoRA split into q/k/v counts fused."""
        sd = {k.replace(".base.", "."): v for k, v in self.state_dict().items() if "lora_" not in k}
        split = {}
        for k in list(sd):
            m = re.fullmatch(r"(.*\.to_qkv)\.([qkv])\.(weight|bias)", k)
            if m:
                split.setdefault(f"{m[1]}.{m[3]}", {})[m[2]] = sd.pop(k)
        sd.update({k: torch.cat([parts[p] for p in "qkv"]) for k, parts in split.items()})
        return state_digest(sd)


def from_codec(codec: SNAC, target_rate: int, init: str = "smart", seed: int = 0,
               interpolator: str = "cubic") -> SNAC48:
    """A 48 kHz model whose pretrained parts are the codec's weights, new block initialised;
    `interpolator` (smart init only): the step-0 upsampling of the codec's output, cubic or hold."""
    if init not in ("smart", "random"):
        raise ValueError(f"init must be 'smart' or 'random', got {init!r}")
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {INTERPOLATORS}, got {interpolator!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SNAC48(snac_config(codec), target_rate)
        missing, unexpected = model.load_state_dict(codec.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("decoder.new_block.") for k in missing), (missing, unexpected)
        if init == "smart":
            smart_init(model, interpolator)
    for part in model.frozen_parts():
        freeze(part)
    return model


def spread_taps(v: torch.Tensor, r: int) -> torch.Tensor:
    """Taps (..., k) -> (..., (k-1)*r+1): the originals with r-1 zeros between them."""
    out = v.new_zeros(*v.shape[:-1], (v.shape[-1] - 1) * r + 1)
    out[..., ::r] = v
    return out


def keys_cubic(r: int) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -1/2) sampled every 1/r: the 4r - 1 taps that
    interpolate a zero-stuffed signal by r (centre tap 1; zero at the other multiples of r)."""
    t = (torch.arange(-(2 * r - 1), 2 * r, dtype=torch.float64) / r).abs()
    return torch.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2)


def hold_quotient(h: torch.Tensor, r: int) -> torch.Tensor:
    """q with h = box_r * q (box_r: r ones, the hold). Exact (remainder 0) for any h that
    reproduces constants: its polyphase parts each sum to 1, so it vanishes where the box does."""
    q, rest = h.clone(), torch.zeros(len(h) - r + 1, dtype=h.dtype)
    for i in range(len(rest)):                  # long division by 1 + z + ... + z^(r-1)
        rest[i] = q[i]
        q[i:i + r] -= rest[i]
    assert q.abs().max() < 1e-12, f"kernel does not factor through the hold: remainder {q.abs().max():g}"
    return rest


def head_taps(w: torch.Tensor, r: int, interpolator: str) -> torch.Tensor:
    """The wide head's taps (out, in, k') from the pretrained head's (out, in, k), so that after
    the hold upsampler its output is the pretrained head's output at the codec rate, upsampled
    by `interpolator`: hold spreads the taps (r - 1 zeros between them, (k - 1) r + 1 taps);
    cubic convolves those with the cubic kernel's quotient by the hold ((k - 1) r + 4r - 1 taps,
    r - 1 leading zeros centre it)."""
    wide = spread_taps(w, r)
    if interpolator == "hold":
        return wide
    q = hold_quotient(keys_cubic(r), r).to(w.dtype)
    o, i, k = wide.shape
    full = torch.nn.functional.conv1d(wide.reshape(o * i, 1, k), q.flip(0)[None, None], padding=len(q) - 1)
    return torch.nn.functional.pad(full.reshape(o, i, -1), (r - 1, 0))


def head_size(k: int, r: int, interpolator: str) -> int:
    """Taps of the wide head made from a k-tap pretrained one (see head_taps)."""
    return (k - 1) * r + (1 if interpolator == "hold" else 4 * r - 1)


@torch.no_grad()
def widen_head(conv: nn.Module, r: int, interpolator: str) -> nn.Module:
    """The undilated weight-normed head for smart init (see the module docstring). hold keeps
    the norm g and the direction v spread (the same |v|); cubic gets the weight it computes."""
    k = head_size(conv.kernel_size[0], r, interpolator)
    wide = WNConv1d(conv.in_channels, conv.out_channels, k, padding=k // 2, device=conv.bias.device)
    src, dst = conv.parametrizations.weight, wide.parametrizations.weight
    if interpolator == "hold":
        dst.original0.copy_(src.original0)
        dst.original1.copy_(spread_taps(src.original1, r))
    else:
        wide.weight = head_taps(conv.weight.detach(), r, interpolator)   # through right_inverse
    wide.bias.copy_(conv.bias)
    return wide


def head_keys(model: SNAC48) -> tuple[str, str]:
    """State-dict keys of the output head's weight-norm g and direction v."""
    n = len(model.decoder.model) - 2
    return tuple(f"decoder.model.{n}.parametrizations.weight.original{i}" for i in (0, 1))


def adapt_head(model: SNAC48, sd: dict) -> dict:
    """`sd` with a pretrained k-tap head (SNAC's own, or the earlier dilated one) made into the
    model's wide head: the function smart init gives it (hold or cubic, told by the taps). Other
    keys untouched; `sd` as it is when its head already fits or fits neither."""
    g_key, v_key = head_keys(model)
    r, wide = model.decoder.factor, model.decoder.model[-2].kernel_size[0]
    k = sd[v_key].shape[-1] if v_key in sd else 0
    if k <= 1 or k >= wide:
        return sd
    if wide == head_size(k, r, "hold"):
        return {**sd, v_key: spread_taps(sd[v_key], r)}
    if wide == head_size(k, r, "cubic") and g_key in sd:
        v = sd[v_key]
        w = sd[g_key] * v / v.norm(dim=(1, 2), keepdim=True)
        w = head_taps(w, r, "cubic")
        return {**sd, g_key: w.norm(dim=(1, 2), keepdim=True), v_key: w}
    return sd


@torch.no_grad()
def smart_init(model: SNAC48, interpolator: str = "cubic") -> None:
    blk = model.decoder.new_block.block
    last = [m for m in model.decoder.model if isinstance(m, DecoderBlock)][-1].block
    snake, up = blk[0], blk[1]
    assert isinstance(snake, Snake1d) and isinstance(up, nn.ConvTranspose1d)
    snake.alpha.fill_(SNAKE_ALPHA)
    r, k, p = up.stride[0], up.kernel_size[0], up.padding[0]
    # y[n] = sum_m x[m] w[n + p - r m]: tap j + p carries x[m] to n = r m + j; hold for j < r
    taps = torch.zeros(k)
    taps[p:p + r] = 1.0
    w = torch.zeros_like(up.weight)
    idx = torch.arange(w.shape[0])
    w[idx, idx % w.shape[1], :] = taps
    up.weight = w                      # through weight_norm's right_inverse
    up.bias.zero_()
    model.decoder.model[-2] = widen_head(model.decoder.model[-2], model.decoder.factor, interpolator)
    pre = [m for m in blk if isinstance(m, (NoiseBlock, ResidualUnit))]
    src = [m for m in last if isinstance(m, (NoiseBlock, ResidualUnit))]
    for dst, s in zip(pre, src):
        dst.load_state_dict(s.state_dict())
        if isinstance(dst, ResidualUnit):
            out_conv = dst.block[-1]
            out_conv.parametrizations.weight.original0.mul_(RESIDUAL_GAIN)   # the norm g; v stays
            out_conv.bias.mul_(RESIDUAL_GAIN)


FROZEN_FOREVER = ("encoder.", "quantizer.")


def matches(name: str, pattern: str) -> bool:
    """A group pattern covers a parameter directly or as a module prefix (fnmatch)."""
    from fnmatch import fnmatchcase
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def param_groups(model, groups: list, lr: float):
    """Optimizer param groups from the phase's groups; everything else frozen.

    A pattern matches a parameter name with fnmatch, directly or as a module prefix
    ("decoder.new_block" covers "decoder.new_block.*"). A pattern matching nothing, a parameter
    matched by two patterns, or a trainable encoder/quantizer parameter is a config error."""
    owner, counts, out = {}, [], []
    names = [n for n, _ in model.named_parameters()]
    for g in groups:
        pat = g["pattern"]
        hits = [n for n in names if matches(n, pat)]
        if not hits:
            raise ValueError(f"group pattern {pat!r} matches no parameter")
        for n in hits:
            if n in owner:
                raise ValueError(f"group patterns {owner[n]!r} and {pat!r} overlap (both match {n})")
            owner[n] = pat
        if g.get("trainable", True) and any(n.startswith(FROZEN_FOREVER) for n in hits):
            raise ValueError(f"group pattern {pat!r} would train the encoder or quantizer; they stay "
                             "frozen so that the codes keep their meaning")
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    for g in groups:
        mine = [n for n, pat in owner.items() if pat == g["pattern"]]
        trainable, factor = g.get("trainable", True), float(g.get("lr_factor", 1.0))
        counts.append({"pattern": g["pattern"], "params": sum(params[n].numel() for n in mine),
                       "trainable": trainable, "lr_factor": factor})
        if trainable:
            for n in mine:
                params[n].requires_grad_(True)
            out.append({"params": [params[n] for n in mine], "lr": lr * factor, "name": g["pattern"]})
    rest = sum(p.numel() for n, p in params.items() if n not in owner)
    counts.append({"pattern": "(no group)", "params": rest, "trainable": False, "lr_factor": 0.0})
    return out, counts


def check_phase_groups(codec_config: dict, target_rate: int, phases: dict) -> None:
    """Check every phase's groups (and LoRA targets) against the model's parameter names without
    weights (meta device): the Snakefile calls this at parse time, so a bad pattern in the last
    phase fails before the first phase trains. Raises ValueError naming the phase and pattern."""
    from .lora import LoRAConfig, apply_lora
    for name, s in phases.items():
        try:
            with torch.device("meta"):
                model = SNAC48(codec_config, target_rate)
                if s["lora"]["enabled"]:
                    apply_lora(model, LoRAConfig(**{k: v for k, v in s["lora"].items() if k != "enabled"}))
            param_groups(model, s["groups"], s["lr"])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def save_model(model: SNAC48, folder, extra_config: dict | None = None) -> Path:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": FORMAT})
    cfg = {**model.config, **(extra_config or {}), "weights_digest": state_digest(sd)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load_model(path, device="cpu") -> SNAC48:
    """A folder (config.json + model.safetensors) or a final.pt file."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file
        cfg = json.loads((path / "config.json").read_text())
        sd = load_file(path / "model.safetensors")
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        cfg, sd = blob["config"], blob["state_dict"]
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model (format {cfg.get('format')!r})")
    head = cfg.get("head", {}).get("kernel_size")
    dilation = cfg.get("new_block", {}).get("head_dilation")
    if dilation:          # saved before the head was undilated: its 7 taps dilated, now spread
        n = max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.model."))   # the head (tanh has none)
        head = (sd[f"decoder.model.{n}.parametrizations.weight.original1"].shape[-1] - 1) * dilation + 1
    model = SNAC48(cfg["codec"], cfg["target_rate"], head)
    model.load_state_dict(adapt_head(model, sd), strict=True)
    model.eval()
    for part in model.frozen_parts():
        freeze(part)
    return model.to(device)


def export_final(phase_dir, out) -> None:
    """final.pt (torch.load(weights_only=True)-safe dict) + model.safetensors + config.json."""
    model = load_model(phase_dir)
    out = Path(out)
    cfg = {**json.loads((Path(phase_dir) / "config.json").read_text()), **model.config}   # head as loaded
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": cfg, "state_dict": sd}, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)
    save_model(model, out.parent, {k: v for k, v in cfg.items() if k not in model.config})
    print(f"wrote {out} and {out.parent}/model.safetensors + config.json "
          f"({sum(v.numel() for v in sd.values()) / 1e6:.2f} M parameters)")
