"""SNAC (hubertsiuzdak/snac: 24, 32 and 44 kHz) behind the seam (pipeline/model/codecs/base.py).

The codec (`Snac`): snac.SNAC with the project's Snake (pipeline/model/snake.py: the same numbers
and state-dict keys, no TorchScript), loaded strictly from the official layout (config.json +
pytorch_model.bin) or config.json + model.safetensors. Its geometry: hop = prod(encoder_rates),
strides = vq_strides, pad_to = hop * lcm(coarsest stride, attn_window_size); every codebook is
used (n_q, if given, must be their number). Noise: the decoder's NoiseBlocks add random noise;
`noise_disabled()` turns them into identities (nestable).

The 48 kHz model (`Snac48`): the frozen SNAC encoder and quantizer, and SNAC's decoder with one new
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
so model_from_saved rebuilds any of them;
models saved with the earlier dilated head (`new_block.head_dilation`) load with spread taps.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from snac import SNAC
from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, WNConv1d
from snac.layers import Snake1d as SnacSnake
from torch import nn
from torch.nn import functional as F

from ...geometry import Geometry
from ...settings import TRAIN_DEFAULTS
from ..snake import Snake1d, use_snake
from .base import NEW_BLOCK, Codec, Model48, Stage, decode_reach, freeze, reach, state_digest, with_codec_weights
from .heads import RESIDUAL_GAIN, head_size, head_taps, spread_taps

FAMILY = "snac"
FORMAT = "phase11-snac48/1"
SNAKE_ALPHA = 1e-4

# The official SNAC models' shapes by name (hubertsiuzdak/snac_24khz, _32khz, _44khz), for
# benchmarks that need the real sizes without the weights.
SHAPES = {
    "snac_24khz": dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "snac_32khz": dict(sampling_rate=32000, encoder_dim=64, encoder_rates=[2, 3, 8, 8], decoder_dim=1536,
                decoder_rates=[8, 8, 3, 2], attn_window_size=32, codebook_size=4096, codebook_dim=8,
                vq_strides=[4, 2, 1], noise=True, depthwise=True),
    "snac_44khz": dict(sampling_rate=44100, encoder_dim=64, encoder_rates=[2, 4, 8, 8], decoder_dim=1536,
                decoder_rates=[8, 8, 4, 2], attn_window_size=32, codebook_size=4096, codebook_dim=8,
                vq_strides=[8, 4, 2, 1], noise=True, depthwise=True),
}

SNAC_KEYS = ("sampling_rate", "encoder_dim", "encoder_rates", "latent_dim", "decoder_dim",
             "decoder_rates", "attn_window_size", "codebook_size", "codebook_dim", "vq_strides",
             "noise", "depthwise")


def check_n_q(cfg: dict, n_q) -> None:
    if n_q is not None and n_q != len(cfg["vq_strides"]):
        raise ValueError(f"n_q {n_q}: a SNAC codec uses all its {len(cfg['vq_strides'])} codebooks (codec.n_q "
                         "null); fewer codebooks is a Mimi setting")


def geometry(cfg: dict, target_rate: int, n_q: int | None = None) -> Geometry:
    check_n_q(cfg, n_q)
    rate = int(cfg["sampling_rate"])
    hop = int(math.prod(cfg["encoder_rates"]))
    strides = tuple(int(s) for s in cfg["vq_strides"])
    if (hop * target_rate) % rate:
        raise ValueError(f"target rate {target_rate} is not a whole number of samples per codec hop "
                         f"({hop} samples at {rate} Hz)")
    window = int(cfg.get("attn_window_size") or 1)
    pad_to = hop * math.lcm(strides[0], window)
    return Geometry(rate, int(target_rate), hop, hop * target_rate // rate, strides, pad_to,
                    int(cfg["codebook_size"]), window)


def snac_config(model: SNAC) -> dict:
    """The constructor kwargs of a SNAC instance (what goes into config.json)."""
    return {
        "sampling_rate": int(model.sampling_rate), "encoder_dim": int(model.encoder_dim),
        "encoder_rates": [int(r) for r in model.encoder_rates], "latent_dim": int(model.latent_dim),
        "decoder_dim": int(model.decoder_dim), "decoder_rates": [int(r) for r in model.decoder_rates],
        "attn_window_size": model.attn_window_size, "codebook_size": int(model.codebook_size),
        "codebook_dim": int(model.codebook_dim), "vq_strides": [int(s) for s in model.vq_strides],
        "noise": any(isinstance(m, NoiseBlock) for m in model.decoder.modules()),
        "depthwise": model.encoder.block[1].block[0].block[1].groups > 1,
    }


class Snac(Codec, SNAC):
    """snac.SNAC with the project's Snake, and what the seam asks of a codec."""
    FAMILY = FAMILY
    FROZEN = ("encoder.", "quantizer.")

    def __init__(self, **config):
        SNAC.__init__(self, **{k: config[k] for k in SNAC_KEYS if k in config})
        use_snake(self, SnacSnake)

    def geometry_at(self, target_rate: int) -> Geometry:
        return geometry({k: getattr(self, k) for k in ("sampling_rate", "encoder_rates", "vq_strides",
                                                        "attn_window_size", "codebook_size")}, target_rate)

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> list:
        """Codec-rate audio (B, 1, T) -> codes, exactly as SNAC encodes them (SNAC's preprocess:
        right-padded with zeros to pad_to)."""
        return self.quantizer(self.encoder(self.preprocess(audio)))[1]

    def latents(self, codes: list) -> torch.Tensor:
        return self.quantizer.from_codes(codes)

    def decode(self, codes: list) -> torch.Tensor:
        return self.decoder(self.latents(codes))

    @contextlib.contextmanager
    def noise_disabled(self):
        """SNAC's NoiseBlocks as identities inside (deterministic decoding), restored after. Nests:
        an inner use leaves the blocks an outer one switched off to the outer one."""
        blocks = [m for m in self.modules() if isinstance(m, NoiseBlock) and "forward" not in vars(m)]
        for b in blocks:
            b.forward = lambda x: x
        try:
            yield self
        finally:
            for b in blocks:
                del b.forward

    def context(self, side: str) -> tuple[int, int]:
        """(left, right): finest frames of input before and after a frame that `side` depends on
        ("encoder": audio -> latents; "decoder": codes -> audio), in whole quanta, measured once a
        side (two forward passes, noise off: a decoder alone never runs the encoder). SNAC's
        convolutions are centred, so its reach is the same both ways: the larger measured side
        counts for both (a side measured just under the floor stays covered)."""
        known = self.__dict__.setdefault("_context", {})
        if side not in known:
            g, dev = self.geometry_at(self.sampling_rate), next(self.parameters()).device
            with self.noise_disabled():
                measured = (reach(self.encoder, 1, g.hop, g.quantum, dev) if side == "encoder" else
                            decode_reach(self.decode, g, dev) if side == "decoder" else None)
            if measured is None:
                raise ValueError(f"context: side must be 'encoder' or 'decoder', got {side!r}")
            known[side] = (max(measured),) * 2
        return known[side]

    def save(self, folder, official: bool = False) -> Path:
        """config.json + model.safetensors (official: pytorch_model.bin, SNAC's own layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(snac_config(self), indent=2) + "\n")
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if official:
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file
            save_file(sd, folder / "model.safetensors")
        return folder

    # the demo codec's training (pipeline/training/democodec.py) trains SNAC's quantizer too
    def encode_with_losses(self, audio: torch.Tensor, seen: list | None = None):
        """audio (B, 1, T) -> (quantized latents, codebook loss, commitment loss), gradients through
        the quantizer by the straight-through estimator; `seen` as in quantize_with_losses."""
        return self.quantize_with_losses(self.encoder(audio), seen)

    def decode_quantized(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents -> audio at the codec rate (with gradients)."""
        return self.decoder(z_q)

    def quantize_with_losses(self, z, seen: list | None = None):
        """SNAC's ResidualVectorQuantize.forward, also returning codebook and commitment losses
        (VQ-VAE style, per residual level on the factorised latents). `seen`, if given, collects
        per level (indices, latents) for dead-code resets."""
        z_q, residual, cb, commit = 0.0, z, 0.0, 0.0
        for vq in self.quantizer.quantizers:
            r = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
            z_e = vq.in_proj(r)
            q, idx = vq.decode_latents(z_e)
            if seen is not None:
                seen.append((idx.detach(), z_e.detach()))
            cb = cb + F.mse_loss(q, z_e.detach())
            commit = commit + F.mse_loss(z_e, q.detach())
            q = vq.out_proj(z_e + (q - z_e).detach())
            if vq.stride > 1:
                q = q.repeat_interleave(vq.stride, dim=-1)
            z_q, residual = z_q + q, residual - q
        return z_q, cb, commit

    @torch.no_grad()
    def reset_dead_codes(self, usage: list, latents: list, rng) -> int:
        """Re-seed codes unused since the last reset with latents of the current batch (a standard
        remedy for codebook collapse, which a small codebook trained briefly otherwise suffers)."""
        n = 0
        for vq, used, z_e in zip(self.quantizer.quantizers, usage, latents):
            dead = torch.nonzero(used == 0).flatten()
            if len(dead):
                pool = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
                pick = torch.from_numpy(rng.integers(len(pool), size=len(dead))).to(pool.device)
                vq.codebook.weight[dead] = pool[pick] + 1e-3 * torch.randn(len(dead), pool.shape[1]).to(pool.device)
                n += len(dead)
            used.zero_()
        return n


def read_state_dict(folder: Path) -> dict:
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin "
                            "(expected the official SNAC layout: config.json + pytorch_model.bin)")


def load_codec(folder, n_q: int | None = None, device="cpu") -> Snac:
    """A SNAC checkpoint folder (official `config.json` + `pytorch_model.bin`, or `config.json` +
    `model.safetensors`), strictly, frozen, in eval mode."""
    from . import read_config
    folder, cfg = Path(folder), read_config(folder)
    unknown = set(cfg) - set(SNAC_KEYS)
    if unknown:
        raise ValueError(f"{folder}/config.json: keys SNAC does not take: {sorted(unknown)}")
    check_n_q(cfg, n_q)
    model = Snac(**cfg)
    model.load_state_dict(read_state_dict(folder), strict=True)
    return freeze(model).to(device)


def build_codec(config: dict, seed: int = 0, n_q: int | None = None) -> Snac:
    """A SNAC from constructor kwargs with a fixed seed (the demo codec's starting point; random
    weights of a published shape for the benches)."""
    check_n_q(config, n_q)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Snac(**config)


def convert_official(src, dst) -> dict:
    """Official SNAC folder (config.json + pytorch_model.bin) -> model.safetensors + config.json,
    verified by reloading the written file and comparing every tensor (dtype, shape, bytes)."""
    from safetensors.torch import load_file
    src, dst = Path(src), Path(dst)
    if not (src / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"{src}: no pytorch_model.bin (official SNAC layout expected)")
    model = load_codec(src)
    original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.save(dst)
    written = load_file(dst / "model.safetensors")
    bad = [k for k in original if k not in written or written[k].dtype != original[k].dtype
           or written[k].shape != original[k].shape or not torch.equal(written[k], original[k])]
    extra = sorted(set(written) - set(original))
    if bad or extra:
        raise RuntimeError(f"round trip failed: {len(bad)} tensors differ ({bad[:5]}), extra {extra[:5]}")
    return {"tensors": len(original), "digest": state_digest(original), "out": str(dst)}


# ---- the 48 kHz model --------------------------------------------------------------------------
class Decoder48(nn.Module):
    """SNAC's decoder layers (`model`, the head possibly widened) and the new block before the head."""

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

    def layers(self) -> list:
        return [*self.model[:-3], self.new_block, *self.model[-3:]]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class Snac48(Model48, Snac):
    """Encoder and quantizer of a SNAC codec (frozen) + Decoder48 at target_rate."""

    def __init__(self, codec_config: dict, target_rate: int, head_kernel: int | None = None):
        """head_kernel: taps of the output conv (None: SNAC's own, 7); smart init widens it."""
        codec_config = {k: codec_config[k] for k in SNAC_KEYS if k in codec_config}
        factor = target_rate // codec_config["sampling_rate"]
        if factor * codec_config["sampling_rate"] != target_rate or factor < 2:
            raise ValueError(f"target rate {target_rate} must be an integer multiple (>= 2) of the "
                             f"codec rate {codec_config['sampling_rate']}")
        super().__init__(**codec_config)
        self.codec_config, self.target_rate = snac_config(self), target_rate
        self.decoder = Decoder48(self.decoder, codec_config["decoder_rates"], factor, codec_config.get("noise", True),
                                 codec_config.get("depthwise", True), head_kernel)
        use_snake(self, SnacSnake)      # the new block's: no TorchScript in the forward

    @property
    def config(self) -> dict:
        return {"format": FORMAT, "codec": self.codec_config, "target_rate": self.target_rate,
                "new_block": {"stride": self.decoder.factor},
                "head": {"kernel_size": self.decoder.model[-2].kernel_size[0]}}

    def geometry_at(self, target_rate: int) -> Geometry:
        return geometry(self.codec_config, target_rate)

    def stages(self) -> list:
        """The decoder's layers in order (input conv, attention, its blocks, the new block, Snake,
        head, tanh), each with its output rate; the DecoderBlocks are the blocks."""
        d, rate = self.decoder, self.sampling_rate / math.prod(self.encoder_rates)
        rates = iter(d.rates)
        out, n = [], len(d.model)
        for i, layer in enumerate(d.layers()):
            if isinstance(layer, DecoderBlock):
                rate *= d.factor if layer is d.new_block else next(rates)
            name = NEW_BLOCK if layer is d.new_block else f"decoder.model.{i if i < n - 3 else i - 1}"
            out.append(Stage(name, layer, rate, isinstance(layer, DecoderBlock)))
        return out

    @property
    def head_key(self) -> str:
        """The state-dict key of the output head's taps (weight-norm direction v)."""
        return f"decoder.model.{len(self.decoder.model) - 2}.parametrizations.weight.original1"

    def adapt_head(self, sd: dict) -> dict:
        """`sd` with a pretrained k-tap head (SNAC's own, or the earlier dilated one) made into the
        model's wide head: the function smart init gives it (hold or cubic, told by the taps). Other
        keys untouched; `sd` as it is when its head already fits or fits neither."""
        v_key = self.head_key
        g_key = v_key[:-1] + "0"
        r, wide = self.decoder.factor, self.decoder.model[-2].kernel_size[0]
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


def from_codec(codec: Snac, target_rate: int, init: str = TRAIN_DEFAULTS["init"],
               seed: int = TRAIN_DEFAULTS["seed"], interpolator: str = TRAIN_DEFAULTS["interpolator"]) -> Snac48:
    """A 48 kHz model whose pretrained parts are the codec's weights, new block initialised;
    `interpolator` (smart init only): the step-0 upsampling of the codec's output, cubic or hold."""
    return with_codec_weights(lambda: Snac48(snac_config(codec), target_rate), codec, init, seed, interpolator, smart_init)


def model_from_config(config: dict, target_rate: int, n_q: int | None = None) -> Snac48:
    """The 48 kHz model of a codec config, weights as constructed (build it on the meta device
    for its parameter names alone)."""
    check_n_q(config, n_q)
    return Snac48(config, target_rate)


def model_from_saved(cfg: dict, sd: dict) -> Snac48:
    """The model a saved config.json (or final.pt's config) and its weights describe."""
    head = cfg.get("head", {}).get("kernel_size")
    dilation = cfg.get("new_block", {}).get("head_dilation")
    if dilation:          # saved before the head was undilated: its 7 taps dilated, now spread
        n = max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.model."))   # the head (tanh has none)
        head = (sd[f"decoder.model.{n}.parametrizations.weight.original1"].shape[-1] - 1) * dilation + 1
    model = Snac48(cfg["codec"], cfg["target_rate"], head)
    model.load_state_dict(model.adapt_head(sd), strict=True)
    return model


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


@torch.no_grad()
def smart_init(model: Snac48, interpolator: str = TRAIN_DEFAULTS["interpolator"]) -> None:
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
