"""Codes as users hand them in, checked against the codec's geometry: one check shared by the
`decode` command and the library (`pipeline.load(...).decode`, streams), so both refuse bad codes
with the same one-line messages.

Layouts:
  * SNAC's: one integer array per codebook, coarsest first, `(B, T_i)` (or `(T_i,)`: one clip),
    codebook i holding frames / stride_i codes. In memory: a list of tensors or arrays; on disk
    (`.npz`): a numpy.savez archive, keys sorted naturally (codes_0, codes_1, ... or arr_0, ...).
  * Orpheus' flat token list (`.json`: a JSON array of integers; `.txt`: integers separated by
    whitespace or commas, or Orpheus' `<custom_token_N>` tokens): defined for 3 codebooks with
    strides 4/2/1 (snac_24khz), 7 tokens per coarsest code, in the order Orpheus writes them:
        c0[t], c1[2t], c2[4t], c2[4t+1], c1[2t+1], c2[4t+2], c2[4t+3]
    either as raw codes (every value in [0, codebook_size)) or with Orpheus' position offsets (the
    token at position p of a frame is code + p * codebook_size, so position p holds values in
    [p * codebook_size, (p + 1) * codebook_size)). The two forms cannot be confused: positions
    1-6 are below codebook_size in the raw form and at or above it in the offset form. A
    `<custom_token_N>` is the offset form's value N - 10; N < 10 are Orpheus' control tokens (start
    and end of speech, ...), which are skipped.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

NPZ_HINT = "numpy.savez of one int array per codebook, coarsest first"
LIST_HINT = "a list of (batch, codes) integer tensors, one per codebook, coarsest first"
ORPHEUS_FRAME = 7           # tokens per coarsest code in Orpheus' layout
ORPHEUS_STRIDES = (4, 2, 1)  # the only geometry the layout is defined for (a definition, not a rate)
ORPHEUS_CONTROL = 10        # <custom_token_N> below this are Orpheus' control tokens


def check_codes(arrays, geo, src: str, names: list, hint: str, labels: list | None = None) -> list:
    """Integer arrays or tensors, one per codebook -> the same, each 2-D (B, T_i), or a
    ValueError with one line naming what is wrong. `src` names the whole (a file, "codes"),
    `names` the arrays (npz keys, codes[i]), `labels` how a message about one array starts
    (default: "SRC: NAME")."""
    labels = labels or [f"{src}: {k}" for k in names]
    if len(arrays) != geo.n_codebooks:
        raise ValueError(f"{src}: {len(arrays)} arrays {list(names)}, the codec has {geo.n_codebooks} codebooks "
                         f"(expected {hint})")
    for where, a in zip(labels, arrays):
        if _kind(a) in "fc" and not bool(_isfinite(a).all()):
            raise ValueError(f"{where} holds NaN/Inf: codes are integer indices in [0, {geo.codebook_size})")
    for where, a in zip(labels, arrays):
        if _kind(a) not in "iu":
            raise ValueError(f"{where} is {_dtype(a)}, not integers: codes are integer indices in "
                             f"[0, {geo.codebook_size}) (cast with .astype(int) if the values are whole)")
        shape = tuple(a.shape)
        if len(shape) not in (1, 2):
            raise ValueError(f"{where} has shape {shape}: expected (codes,) or (batch, codes)")
        if _size(a) == 0:
            raise ValueError(f"{where} is empty (shape {shape})")
        lo, hi = _minmax(a)
        if lo < 0 or hi >= geo.codebook_size:
            raise ValueError(f"{where} has codes outside [0, {geo.codebook_size}): min {lo}, max {hi}")
    shapes = [tuple(a.shape) for a in arrays]
    if len({len(s) for s in shapes}) > 1 or len({s[0] for s in shapes if len(s) == 2}) > 1:
        raise ValueError(f"{src}: shapes {shapes} mix clips and batches; every codebook needs the same "
                         "(codes,) or (batch, codes) layout")
    arrays = [a if len(a.shape) == 2 else a[None] for a in arrays]
    lens = [a.shape[1] for a in arrays]
    if len({n * s for n, s in zip(lens, geo.strides)}) != 1:
        raise ValueError(f"{src}: shapes {shapes} do not fit the codec's strides {list(geo.strides)} (codebook i "
                         "holds frames / stride_i codes; a 2-D array is (batch, codes))")
    frames = lens[-1] * geo.strides[-1]
    if frames % geo.quantum:
        window = getattr(geo, "attn_window", 1)
        why = (f"SNAC's local attention works on whole windows of {window} frames" if window > 1 else
               f"whole codes of the coarsest codebook, stride {max(geo.strides)}")
        raise ValueError(f"{src}: {frames} finest frames is not a multiple of {geo.quantum} ({why})")
    return arrays


def as_tensors(codes, geo, device, src: str = "codes") -> list:
    """The library's input (a list of tensors or arrays, SNAC's layout) -> checked (B, T_i) int64
    tensors on `device`."""
    import torch
    if isinstance(codes, (torch.Tensor, np.ndarray)) or not hasattr(codes, "__len__"):
        raise ValueError(f"{src}: a {type(codes).__name__}, expected {LIST_HINT}")
    arrays = [c if isinstance(c, (torch.Tensor, np.ndarray)) else np.asarray(c) for c in codes]
    names = [f"{src}[{i}]" for i in range(len(arrays))]
    arrays = check_codes(arrays, geo, src, names, LIST_HINT, labels=names)
    return [(torch.from_numpy(a.astype(np.int64)) if isinstance(a, np.ndarray) else a.long()).to(device)
            for a in arrays]


def read_codes(path, geo) -> list:
    """A codes file (.npz, or an Orpheus token list as .json or .txt: see the module docstring) ->
    one (B, T_i) integer array per codebook, checked against the codec's geometry."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".txt"):
        return read_orpheus(path, geo)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory' if path.is_dir() else 'missing file'}, expected {NPZ_HINT}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive (expected {NPZ_HINT}; or an Orpheus token list as "
                         ".json or .txt)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = sorted(z.files, key=lambda k: (len(k), k))
            arrays = [np.asarray(z[k]) for k in keys]
    except Exception as e:   # damaged zip members, pickled objects, bad headers
        raise ValueError(f"{path}: unreadable .npz ({type(e).__name__}: {_first_line(e)})") from None
    return check_codes(arrays, geo, str(path), keys, NPZ_HINT)


# ---- Orpheus' flat token list -----------------------------------------------------------------
def orpheus_order(geo) -> list:
    """(codebook, index within the frame) of each of the 7 tokens of a frame: each code followed
    by its two halves at the next finer codebook (a depth-first walk of the code tree)."""
    def walk(i, k):
        out = [(i, k)]
        if i + 1 < geo.n_codebooks:
            r = geo.strides[i] // geo.strides[i + 1]
            for j in range(r):
                out += walk(i + 1, k * r + j)
        return out
    return walk(0, 0)


def read_orpheus(path, geo) -> list:
    """An Orpheus token list file -> [(1, T_i) int64 arrays], checked."""
    path = Path(path)
    hint = ("an Orpheus token list: a JSON array of integers (.json), or integers or <custom_token_N> "
            "tokens separated by whitespace or commas (.txt)")
    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory' if path.is_dir() else 'missing file'}, expected {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e.reason} at byte {e.start}), expected {hint}") from None
    tokens = parse_tokens(text, path.suffix.lower() == ".json", str(path), hint)
    return orpheus_codes(tokens, geo, str(path))


def parse_tokens(text: str, as_json: bool, src: str, hint: str) -> np.ndarray:
    if as_json:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}: not JSON ({e.msg} at line {e.lineno} column {e.colno}), expected {hint}") from None
        if not isinstance(values, list) or not all(type(v) is int for v in values):
            bad = values if not isinstance(values, list) else next(v for v in values if type(v) is not int)
            raise ValueError(f"{src}: expected a JSON array of integers, found {json.dumps(bad)[:40]}")
        return np.asarray(values, dtype=np.int64)
    if "<custom_token_" in text:
        parts = re.split(r"<custom_token_(\d+)>", text)
        junk = next((p.strip() for p in parts[::2] if p.strip(" \t\r\n,")), None)
        if junk is not None:
            raise ValueError(f"{src}: {junk[:40]!r} between <custom_token_N> tokens (expected {hint})")
        n = np.asarray([int(p) for p in parts[1::2]], dtype=np.int64)
        return n[n >= ORPHEUS_CONTROL] - ORPHEUS_CONTROL
    words = [w for w in re.split(r"[\s,]+", text) if w]
    bad = next((w for w in words if not re.fullmatch(r"[+-]?\d+", w)), None)
    if bad is not None:
        raise ValueError(f"{src}: {bad[:40]!r} is not an integer (expected {hint})")
    return np.asarray([int(w) for w in words], dtype=np.int64)


def orpheus_codes(tokens, geo, src: str = "tokens") -> list:
    """A flat Orpheus token list (raw or position-offset form) -> [(1, T_i) int64 arrays],
    coarsest first, checked like any other codes."""
    if tuple(geo.strides) != ORPHEUS_STRIDES:
        raise ValueError(f"{src}: Orpheus' 7-token layout is defined for 3 codebooks with strides 4/2/1 "
                         f"(snac_24khz); this model's codec has strides {list(geo.strides)}: give its codes "
                         "as .npz, one array per codebook")
    t = np.asarray(tokens, dtype=np.int64).ravel()
    if t.size == 0 or t.size % ORPHEUS_FRAME:
        raise ValueError(f"{src}: {t.size} tokens is not a whole, non-zero number of {ORPHEUS_FRAME}-token frames")
    frames = t.reshape(-1, ORPHEUS_FRAME)
    size, pos = geo.codebook_size, np.arange(ORPHEUS_FRAME)
    if (frames >= size).any():                 # the offset form: position p in [p size, (p + 1) size)
        bad = (frames < pos * size) | (frames >= (pos + 1) * size)
        if bad.any():
            f, p = map(int, np.argwhere(bad)[0])
            raise ValueError(f"{src}: token {f * ORPHEUS_FRAME + p} (frame {f}, position {p}) is {frames[f, p]}: "
                             f"values from {size} up are Orpheus' position-offset form, where position {p} "
                             f"holds [{p * size}, {(p + 1) * size}); raw codes are in [0, {size})")
        frames = frames - pos * size
    order = orpheus_order(geo)
    codes = []
    for i, s in enumerate(geo.strides):
        cols = [j for j, (cb, _) in enumerate(order) if cb == i]   # in time order within the frame
        codes.append(frames[:, cols].reshape(1, -1))
    names = [f"codebook {i}" for i in range(geo.n_codebooks)]
    return check_codes(codes, geo, src, names, "an Orpheus token list")


def _kind(a) -> str:
    """numpy's dtype.kind, for tensors too."""
    if isinstance(a, np.ndarray):
        return a.dtype.kind
    name = _dtype(a)
    return ("b" if name == "bool" else "c" if a.dtype.is_complex else "f" if a.dtype.is_floating_point
            else "u" if name.startswith("uint") else "i")


def _size(a) -> int:
    return a.size if isinstance(a, np.ndarray) else a.numel()


def _dtype(a) -> str:
    return str(a.dtype).removeprefix("torch.")


def _isfinite(a):
    if isinstance(a, np.ndarray):
        return np.isfinite(a)
    import torch
    return torch.isfinite(a)


def _minmax(a) -> tuple:
    if isinstance(a, np.ndarray):
        return int(a.min()), int(a.max())
    import torch
    signed = (torch.int8, torch.int16, torch.int32, torch.int64)
    lo, hi = torch.aminmax(a if a.dtype in signed else a.to(torch.int64))   # few ops take uint16+
    return int(lo), int(hi)


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [""])[0]
