"""Learning-rate schedules, as multipliers of the phase's lr for torch's LambdaLR.

cosine  linear warmup over warmup_steps, then cosine from 1 to lr_min_ratio at `steps`
wsd     warmup-stable-decay (what long runs use, since the end of training can be moved without
        redoing the schedule): linear warmup, constant 1, then linear decay to lr_min_ratio over
        the last decay_ratio share of the steps
"""
from __future__ import annotations

import math


def lr_lambda(s: dict):
    warm, total, floor = s["warmup_steps"], s["steps"], s["lr_min_ratio"]
    decay_start = total - max(1, round(s["decay_ratio"] * total))

    def cosine(step: int) -> float:
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    def wsd(step: int) -> float:
        if step < max(warm, decay_start):
            return 1.0
        t = min(1.0, (step - max(warm, decay_start)) / max(1, total - max(warm, decay_start)))
        return 1 - (1 - floor) * t

    after = {"cosine": cosine, "wsd": wsd}[s["schedule"]]
    return lambda step: (step + 1) / warm if step < warm else after(step)
