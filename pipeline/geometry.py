"""Time geometry of a codec: the one description every floor shares (the cache records it, the
data code cuts segments by it, the model and the evaluation decode by it).

Everything in it is derived from a loaded codec's config by its family (pipeline/model/codecs/);
nothing else in the package hard-codes a rate, hop, stride or window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """Code frame t of codebook i (stride s_i) covers codec-rate samples [t*s_i*hop, (t+1)*s_i*hop)
    and target-rate samples [t*s_i*hop_target, (t+1)*s_i*hop_target)."""
    codec_rate: int
    target_rate: int
    hop: int            # codec-rate samples per finest code frame
    hop_target: int     # target-rate samples per finest code frame
    strides: tuple      # per codebook, in finest frames (SNAC's vq_strides; Mimi: all 1)
    pad_to: int         # the encoder pads its input to a multiple of this many codec-rate samples
    codebook_size: int
    attn_window: int    # blocked attention window in finest frames (SNAC's local attention; 1: none)

    @property
    def coarsest(self) -> int:
        return max(self.strides)

    @property
    def quantum(self) -> int:
        """Segments start at, and last, multiples of this many finest frames: whole codes of the
        coarsest codebook and whole windows of a blocked attention."""
        return math.lcm(self.coarsest, self.attn_window)

    @property
    def n_codebooks(self) -> int:
        return len(self.strides)

    def frames(self, n_codec_samples: int) -> int:
        """Finest-codebook frames the encoder produces for an input of this length."""
        return math.ceil(n_codec_samples / self.pad_to) * self.pad_to // self.hop


def geometry_of(fingerprint: dict) -> Geometry:
    """The Geometry a cache fingerprint records."""
    return Geometry(**{k: tuple(v) if k == "strides" else v for k, v in fingerprint.items()
                       if k in Geometry.__dataclass_fields__})
