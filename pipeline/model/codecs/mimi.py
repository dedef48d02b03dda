"""Mimi (Kyutai's 24 kHz, 12.5 Hz codec of Moshi, Sesame CSM and Kyutai TTS) through transformers'
MimiModel, and Mimi48: Mimi's decoder with one new 2x upsampling block, for the same codes.

Folder: what `MimiModel.save_pretrained` writes (config.json with model_type "mimi" +
model.safetensors), loaded strictly into transformers' own modules under their own names
(`encoder.`, `encoder_transformer.`, `downsample.`, `quantizer.`, `upsample.`,
`decoder_transformer.`, `decoder.`), so pretrained weights load by name. `n_q`, the number of
codebooks used (the first n_q: the semantic one, then acoustic ones), is fixed by the pipeline
config, at most the model's num_quantizers; it is part of the geometry (one stride per codebook)
and of the fingerprint.

Geometry (from the loaded config): hop = transformers' frame_size (the product of the encoder's
strides and the 2x downsampling, 1920 for kyutai/mimi), checked against sampling_rate /
frame_rate; every codebook runs at the frame rate (strides all 1); pad_to = hop; attn_window 1:
Mimi's attention is a sliding window over past frames, not blocked windows a segment must fit.

Alignment. Every conv is causal (left padding) and both transformers attend to the past only, so
code frame t is computed from codec samples < (t + 1) hop and its decode fills samples
[t hop, (t + 1) hop) from frames <= t: encoding a prefix of whole frames gives the first codes
of the whole encode, decoding the first n frames the first n hop samples of the whole decode
(tests/test_mimi.py). An input of T samples gives ceil(T / hop) frames. transformers' encode pads
each conv's activations to whole strides (zeros; the downsampling repeats its last value), so its
partial last frame is not the encoding of the input padded with zeros (on the tiny test Mimi, one
of three last codes differs); encode here pads the input with zeros to whole frames first, as
SNAC does, so the last frame too is the encoding of what a zero-padded target holds. The left
edge reaches far: both transformers see sliding_window past steps (twice the frame rate) per layer.

Streaming is off: encode/decode call the submodules with no padding cache and no key/value cache
(`use_cache=False`), so every call decodes a whole utterance on its own. Mimi has no noise blocks:
`noise_disabled()` is a no-op.

Context (`context(side)`: how far encoder and decoder look, for alignment checks, chunked encoding and
streaming): both transformers look back num_hidden_layers x (sliding_window - 1) steps at twice
the frame rate (kyutai/mimi: 8 x 249 steps = 996 frames = 80 s; the tiny test Mimi: 125 frames), a
bound from the config; the convolutions' reach is measured (a few frames). Nothing looks ahead
(a frame's audio comes from that frame and earlier ones), but Mimi48's cubic head (below), by one
frame.

Mimi48 inserts one block between the SEANet decoder's last residual block and its final ELU and
output conv (`decoder.new_block`: a ConvTranspose1d of stride r and kernel 2r, then copies of the
last block's residual units), and smart init makes it start as "the 24 kHz output, upsampled",
as Snac48 does (see snac.py; the head's taps come from heads.py):
  * the transposed conv is a per-channel sample-and-hold (taps 0..r-1 of the identity, the
    causal trim drops the rest), so its output sample r m + j is its input sample m;
  * the residual units are the last block's with their output conv scaled by RESIDUAL_GAIN:
    near identity, the learned detectors kept;
  * ELU is elementwise, so it commutes with the hold, and the head sees the held features;
  * the head (Mimi's 3-tap causal conv) is widened so that on held features it computes the
    pretrained head's 24 kHz output upsampled by the interpolator (cubic: Keys' cubic; hold):
    the causal taps are the centred taps of a kernel twice as long minus one (zeros on the
    right), head_taps widens those, and the all-zero taps at either end are dropped. Keeping the
    24 kHz output's alignment (output sample r n is the 24 kHz sample n) costs the cubic head a
    lookahead of 2r - 1 target samples (the cubic needs the two next codec-rate samples): Mimi48
    is causal up to those (62 us at 48 kHz), a streaming decoder would delay by them. hold
    needs none.
`random` init keeps PyTorch's default init in the new block and Mimi's own head.
config.json records the head's taps and padding, so model_from_saved rebuilds any of them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import MimiConfig, MimiModel
from transformers.models.mimi.modeling_mimi import (MimiConv1d, MimiConvTranspose1d, MimiEuclideanCodebook,
                                                    MimiResnetBlock)

from ...geometry import Geometry
from ...settings import TRAIN_DEFAULTS
from .base import NEW_BLOCK, Codec, Model48, Stage, Staged, freeze, reach, with_codec_weights
from .heads import INTERPOLATORS, RESIDUAL_GAIN, head_taps

FAMILY = "mimi"
FORMAT = "phase11-mimi48/1"
PARTS = ("encoder", "encoder_transformer", "downsample", "quantizer", "upsample", "decoder_transformer", "decoder")
DECODER = ("upsample", "decoder_transformer", "decoder")        # what a whole-decoder group names

# kyutai/mimi's published config.json (what the checkpoint's shapes need), for `bench memory`
# without the weights. Its config gives the frame rate as the older key `frame_rate`.
KYUTAI_MIMI = dict(
    model_type="mimi", sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=512, num_filters=64,
    num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant", compress=2,
    trim_right_ratio=1.0, codebook_size=2048, codebook_dim=256, num_quantizers=32, use_conv_shortcut=False,
    vector_quantization_hidden_dimension=256, num_semantic_quantizers=1, upsample_groups=512,
    num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
    hidden_act="gelu", max_position_embeddings=8000, norm_eps=1e-5, rope_theta=10000.0, sliding_window=250,
    layer_scale_initial_scale=0.01, attention_bias=False, attention_dropout=0.0, use_cache=False)


SHAPES = {"mimi": KYUTAI_MIMI}      # by the name of its folder (kyutai/mimi)


class ChannelsFirst(nn.Module):
    """A transformers MimiTransformerModel on (B, C, T): no caches, the whole sequence at once."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x):
        out = self.transformer(x.transpose(1, 2), past_key_values=None, use_cache=False, return_dict=True)
        return out.last_hidden_state.transpose(1, 2)


def as_config(config) -> MimiConfig:
    return config if isinstance(config, MimiConfig) else MimiConfig.from_dict(config)


def read_config(folder) -> MimiConfig:
    from . import read_config as read_json
    cfg = read_json(folder)
    if cfg.get("model_type") != FAMILY:
        raise ValueError(f"{Path(folder) / 'config.json'}: model_type {cfg.get('model_type')!r}, not {FAMILY!r}")
    return MimiConfig.from_dict(cfg)


def frame_hop(config: MimiConfig) -> int:
    """Codec-rate samples per code frame, from the config's strides, checked against its frame rate."""
    hop = int(config.frame_size)
    if not config.use_causal_conv or config.trim_right_ratio != 1.0:
        raise ValueError("only the causal Mimi is supported (use_causal_conv true, trim_right_ratio 1.0, "
                         "as kyutai/mimi): the alignment and the new block's hold rely on it")
    if hop * config.frame_rate != config.sampling_rate or config.frame_rate == config.encodec_frame_rate:
        raise ValueError(f"Mimi config: frame rate {config.frame_rate} Hz is not sampling_rate "
                         f"{config.sampling_rate} / frame_size {hop} with a 2x downsampling")
    return hop


def geometry(config, target_rate: int, n_q: int | None = None) -> Geometry:
    config = as_config(config)
    n_q = check_n_q(config, n_q)
    rate, hop = int(config.sampling_rate), frame_hop(config)
    if (hop * target_rate) % rate:
        raise ValueError(f"target rate {target_rate} is not a whole number of samples per codec hop "
                         f"({hop} samples at {rate} Hz)")
    return Geometry(rate, int(target_rate), hop, hop * target_rate // rate, (1,) * n_q, hop,
                    int(config.codebook_size), 1)


def check_n_q(config: MimiConfig, n_q: int | None) -> int:
    """n_q, the codebooks used (None: all of them), checked against the config."""
    if n_q is None:
        return int(config.num_quantizers)
    if not config.num_semantic_quantizers <= n_q <= config.num_quantizers:
        raise ValueError(f"n_q {n_q}: Mimi uses {config.num_semantic_quantizers} to {config.num_quantizers} "
                         "codebooks (its first n_q)")
    return int(n_q)


class Mimi(Codec, Staged, nn.Module):
    """The codec: transformers' MimiModel's parts under their own names, using n_q codebooks."""
    FAMILY = FAMILY
    FROZEN = ("encoder.", "encoder_transformer.", "downsample.", "quantizer.")   # fixed: the codes keep their meaning

    def __init__(self, config: MimiConfig, n_q: int | None = None):
        super().__init__()
        self.mimi_config, self.n_q = config, check_n_q(config, n_q)
        base = MimiModel(config)
        for name in PARTS:
            setattr(self, name, getattr(base, name))
        self.register_load_state_dict_post_hook(lambda module, keys: module.fresh_codebooks())

    @property
    def sampling_rate(self) -> int:
        return int(self.mimi_config.sampling_rate)

    @property
    def codebook_size(self) -> int:
        return int(self.mimi_config.codebook_size)

    def geometry_at(self, target_rate: int) -> Geometry:
        return geometry(self.mimi_config, target_rate, self.n_q)

    def identity(self) -> dict:
        """The fingerprint records the family and n_q beside all weights (as SNAC's) and the geometry."""
        return {"family": FAMILY, "n_q": self.n_q}

    def fresh_codebooks(self) -> None:
        """Drop the codebooks' cached embedding table (transformers computes it once from its
        buffers and keeps it as a plain attribute: after a load, a dtype or a device change it
        would be stale: on the old device, in the old dtype, of the old weights)."""
        for m in self.quantizer.modules():
            if isinstance(m, MimiEuclideanCodebook):
                m._embed = None

    def _apply(self, fn, *args, **kwargs):
        self.fresh_codebooks()
        return super()._apply(fn, *args, **kwargs)

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> list:
        """Codec-rate audio (B, 1, T) -> n_q LongTensors (B, ceil(T / hop)): MimiModel.encode of
        the audio right-padded with zeros to whole frames (as SNAC pads its input)."""
        pad = -audio.shape[-1] % frame_hop(self.mimi_config)
        x = self.encoder(nn.functional.pad(audio, (0, pad)))
        x = ChannelsFirst(self.encoder_transformer)(x)
        codes = self.quantizer.encode(self.downsample(x), self.n_q)        # (n_q, B, frames)
        return list(codes.unbind(0))

    def latents(self, codes: list) -> torch.Tensor:
        """Codes -> the quantized latents (B, hidden, frames): frozen, the decoder path's input."""
        if len(codes) != self.n_q:
            raise ValueError(f"{len(codes)} codebooks given, the model uses n_q = {self.n_q}")
        return self.quantizer.decode(torch.stack(list(codes), 1))

    def stages(self) -> list:
        """The decoder path in order: the upsampling to twice the frame rate, the transformer, then
        the SEANet decoder's layers grouped as its blocks (an ELU starts each: ELU, transposed
        conv, residual units; the last group is the final ELU and the output conv)."""
        rate = 2 * float(self.mimi_config.frame_rate)
        out = [Stage("upsample", self.upsample, rate),
               Stage("decoder_transformer", ChannelsFirst(self.decoder_transformer), rate, block=True)]
        layers = list(self.decoder.layers)
        starts = [0] + [i for i, m in enumerate(layers) if isinstance(m, nn.ELU)] + [len(layers)]
        ratios = iter(self.mimi_config.upsampling_ratios)        # (not the convs' own: LoRA may wrap them)
        for a, b in zip(starts, starts[1:]):
            ups = [next(ratios) for m in layers[a:b] if isinstance(m, MimiConvTranspose1d)]
            rate *= math.prod(ups)
            name = f"decoder.layers.{a}" if b == a + 1 else f"decoder.layers.{a}-{b - 1}"
            out.append(Stage(name, layers[a] if b == a + 1 else nn.Sequential(*layers[a:b]), rate, bool(ups)))
        return out

    def context(self, side: str) -> tuple[int, int]:
        """(left, right): finest frames before and after a frame that `side` ("encoder" or
        "decoder") depends on: the transformers' bound from the config plus the convolutions'
        reach, measured once a side (the transformer left out: two forward passes)."""
        known = self.__dict__.setdefault("_context", {})
        if side not in known:
            c, dev = self.mimi_config, next(self.parameters()).device
            steps = round(c.encodec_frame_rate / c.frame_rate)         # transformer steps per frame (2)
            look_back = math.ceil(c.num_hidden_layers * (c.sliding_window - 1) / steps) + 1
            if side == "encoder":
                left, right = reach(lambda x: self.downsample(self.encoder(x)), 1, frame_hop(c), 1, dev)
            elif side == "decoder":
                convs = nn.Sequential(*(s.module for s in self.stages() if s.name != "decoder_transformer"))
                left, right = reach(convs, c.hidden_size, 1, 1, dev)
            else:
                raise ValueError(f"context: side must be 'encoder' or 'decoder', got {side!r}")
            known[side] = (left + look_back, right)
        return known[side]

    def save(self, folder) -> Path:
        """What MimiModel.save_pretrained writes: config.json (model_type mimi) + model.safetensors."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(self.mimi_config.to_json_string())
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        return folder


def read_weights(folder) -> dict:
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (a folder written by MimiModel.save_pretrained "
                                "expected)")
    from safetensors.torch import load_file
    return load_file(path)


def load_codec(folder, n_q: int | None = None, device="cpu") -> Mimi:
    """A Mimi folder (MimiModel.save_pretrained), strictly, frozen, in eval mode; n_q None: all."""
    config = read_config(folder)
    frame_hop(config)
    model = Mimi(config, n_q)
    model.load_state_dict(read_weights(folder), strict=True)
    return freeze(model).to(device)


def build_codec(config: dict, seed: int = 0, n_q: int | None = None) -> Mimi:
    """A Mimi of a config's shapes with random weights (transformers' init), for the benches."""
    config = as_config(config)
    frame_hop(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return freeze(Mimi(config, n_q))


# -- the 48 kHz model -------------------------------------------------------------------------

class PaddedConv(nn.Module):
    """A conv with explicit (left, right) zero padding: the widened head (names as MimiConv1d's)."""

    def __init__(self, channels: int, out: int, kernel: int, padding: tuple):
        super().__init__()
        self.conv, self.padding = nn.Conv1d(channels, out, kernel), tuple(int(p) for p in padding)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, self.padding))


def causal_head_taps(w: torch.Tensor, r: int, interpolator: str) -> tuple:
    """Taps (out, in, k) of a causal conv (output n sees inputs n - k + 1 .. n) -> (the wide
    head's taps, its (left, right) padding): head_taps of the same conv written centred (2k - 1
    taps, k - 1 zeros on the right), less the taps that are zero whatever the weights."""
    k = w.shape[-1]
    wide = head_taps(nn.functional.pad(w, (0, k - 1)), r, interpolator)
    probe = head_taps(nn.functional.pad(torch.ones(1, 1, k, dtype=torch.float64), (0, k - 1)), r, interpolator)
    live = probe[0, 0].nonzero().flatten()
    first, last, centre = int(live[0]), int(live[-1]), wide.shape[-1] // 2
    return wide[..., first:last + 1].contiguous(), (centre - first, last - centre)


class Decoder48(nn.Module):
    """Mimi's SEANet decoder (its `layers`, the head possibly widened) and the new block."""

    def __init__(self, decoder: nn.Module, config: MimiConfig, factor: int, head: dict | None = None):
        super().__init__()
        self.layers, self.factor = decoder.layers, factor
        channels = config.num_filters
        units = [MimiResnetBlock(config, channels, (config.dilation_growth_rate ** j, 1))
                 for j in range(config.num_residual_layers)]
        self.new_block = nn.Sequential(MimiConvTranspose1d(config, channels, channels, 2 * factor, factor), *units)
        if head is not None:                     # smart init's wide head
            self.layers[-1] = PaddedConv(channels, config.audio_channels, head["kernel_size"], head["padding"])

    @property
    def head(self) -> dict | None:
        h = self.layers[-1]
        if not isinstance(h, PaddedConv):
            return None
        return {"kernel_size": h.conv.kernel_size[0], "padding": list(h.padding)}


class Mimi48(Model48, Mimi):
    """Mimi's encoder and quantizer (frozen) + its decoder path with a new block, at target_rate."""

    def __init__(self, config: MimiConfig, n_q: int | None, target_rate: int, head: dict | None = None):
        super().__init__(config, n_q)
        factor = target_rate // config.sampling_rate
        if factor * config.sampling_rate != target_rate or factor < 2:
            raise ValueError(f"target rate {target_rate} must be an integer multiple (>= 2) of the "
                             f"codec rate {config.sampling_rate}")
        self.target_rate = int(target_rate)
        self.decoder = Decoder48(self.decoder, config, factor, head)

    @property
    def config(self) -> dict:
        return {"format": FORMAT, "family": FAMILY, "codec": self.mimi_config.to_dict(), "n_q": self.n_q,
                "target_rate": self.target_rate, "new_block": {"stride": self.decoder.factor},
                "head": self.decoder.head}

    def stages(self) -> list:
        """Mimi's stages with the new block before the last (the final ELU and the head)."""
        out = super().stages()
        rate = out[-2].rate * self.decoder.factor
        return [*out[:-1], Stage(NEW_BLOCK, self.decoder.new_block, rate, True), out[-1]._replace(rate=rate)]

    @property
    def head_key(self) -> str:
        """The state-dict key of the output head's taps."""
        return f"decoder.layers.{len(self.decoder.layers) - 1}.conv.weight"

    def adapt_head(self, sd: dict) -> dict:
        """`sd` with a pretrained k-tap (causal) head made into the model's wide head, as smart init
        places it (hold or cubic, told by the taps); `sd` as it is when its head already fits."""
        head, key = self.decoder.head, self.head_key
        if head is None or key not in sd or sd[key].shape[-1] == head["kernel_size"]:
            return sd
        for interpolator in INTERPOLATORS:
            taps, padding = causal_head_taps(sd[key], self.decoder.factor, interpolator)
            if taps.shape[-1] == head["kernel_size"] and list(padding) == head["padding"]:
                return {**sd, key: taps}
        return sd


def from_codec(codec: Mimi, target_rate: int, init: str = TRAIN_DEFAULTS["init"],
               seed: int = TRAIN_DEFAULTS["seed"], interpolator: str = TRAIN_DEFAULTS["interpolator"]) -> Mimi48:
    """A 48 kHz model whose pretrained parts are the codec's weights, new block initialised."""
    return with_codec_weights(lambda: Mimi48(codec.mimi_config, codec.n_q, target_rate), codec, init, seed, interpolator, smart_init)


@torch.no_grad()
def smart_init(model: Mimi48, interpolator: str = TRAIN_DEFAULTS["interpolator"]) -> None:
    dec, r = model.decoder, model.decoder.factor
    up = dec.new_block[0].conv
    assert dec.new_block[0].padding_left == 0 and dec.new_block[0].padding_right == r   # causal trim
    w = torch.zeros_like(up.weight)                  # (in, out, 2r): taps 0..r-1 carry x[m] to r m + j
    w[torch.arange(w.shape[0]), torch.arange(w.shape[0]), :r] = 1.0
    up.weight.copy_(w)
    up.bias.zero_()
    units = [m for m in dec.layers if isinstance(m, MimiResnetBlock)]
    for dst, src in zip(dec.new_block[1:], units[len(units) - len(dec.new_block) + 1:]):
        dst.load_state_dict(src.state_dict())
        out_conv = dst.block[-1].conv
        out_conv.weight.mul_(RESIDUAL_GAIN)
        out_conv.bias.mul_(RESIDUAL_GAIN)
        if isinstance(dst.shortcut, MimiConv1d):     # a conv shortcut starts as the identity
            dst.shortcut.conv.weight.copy_(torch.eye(out_conv.out_channels)[..., None])
            dst.shortcut.conv.bias.zero_()
    head = dec.layers[-1]
    taps, padding = causal_head_taps(head.conv.weight, r, interpolator)
    wide = PaddedConv(head.conv.in_channels, head.conv.out_channels, taps.shape[-1], padding)
    wide.conv.weight.copy_(taps)
    wide.conv.bias.copy_(head.conv.bias)
    dec.layers[-1] = wide.to(head.conv.weight.device)


def model_from_config(config, target_rate: int, n_q: int | None = None) -> Mimi48:
    """The 48 kHz model of a codec config, weights as constructed (build it on the meta device
    for its parameter names alone)."""
    return Mimi48(as_config(config), n_q, target_rate)


def model_from_saved(cfg: dict, sd: dict) -> Mimi48:
    """The model a saved config.json (or final.pt's config) and its weights describe."""
    model = Mimi48(MimiConfig.from_dict(cfg["codec"]), cfg["n_q"], cfg["target_rate"], cfg.get("head"))
    model.load_state_dict(model.adapt_head(sd), strict=True)
    return model
