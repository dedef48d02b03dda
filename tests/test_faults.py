"""The fault table of issue 8, one test per row: each reproduces the fault as a user meets it and
asserts the user-facing message (one line, no traceback, non-zero exit), or the bound that now
holds. Rows are added by whoever fixes them; this file holds those of config validation and of the
inference CLIs (`resynth`, `decode`)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import yaml
from conftest import ROOT, TINY_24K, speechlike, tiny_codec

from workflow_util import make_tree, snakemake

CLI = [sys.executable, "-m", "pipeline"]


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, "COLUMNS": "400", **(env or {})})


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The failed command's message: exit 1, no traceback, exactly one line starting 'error:'."""
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny trained-model folder (snac_24khz geometry at toy width, 48 kHz out)."""
    from pipeline.model import snac48 as M
    d = tmp_path_factory.mktemp("model")
    M.save_model(M.from_codec(tiny_codec(config=dict(TINY_24K, noise=False)), 48000), d)
    return d


# ---- a typo under codec.demo.config / codec.demo.lambdas ---------------------------------------
@pytest.fixture(scope="module")
def code_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("wf") / "code")


@pytest.mark.parametrize("override, key, where", [
    ("codec: {demo: {config: {decoder_dmi: 64}}}\n", "decoder_dmi", "['codec']['demo']['config']"),
    ("codec: {demo: {lambdas: {mle: 2.0}}}\n", "mle", "['codec']['demo']['lambdas']"),
])
def test_typo_under_demo_codec_fails_at_parse_time(code_tree, override, key, where):
    """Before: passed the schema; the demo_codec job failed with a traceback after Snakemake had
    deleted the existing codec. Now Snakemake refuses the config, naming the key, before any job."""
    (code_tree / "typo.yaml").write_text(override)
    r = snakemake(code_tree, configfiles=("fast.yaml", "typo.yaml"), extra=("-n",))
    assert r.rc != 0 and not r.jobs and "Building DAG" not in r.out, r.out[-3000:]
    assert f"'{key}' was unexpected" in r.out and f"On instance{where}" in r.out, r.out[-3000:]
    assert not (code_tree / "results").exists()


def test_demo_codec_schema_lists_what_the_code_takes():
    """The schema's keys are exactly SNAC's constructor arguments and the loss terms, and the
    embedded config passes it (a wrong type fails)."""
    import jsonschema
    from pipeline.model.codec import SNAC_KEYS
    from pipeline.training.losses import LOSS_TERMS
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    demo = schema["properties"]["codec"]["properties"]["demo"]["properties"]
    assert set(demo["config"]["properties"]) == set(SNAC_KEYS)
    assert set(demo["lambdas"]["properties"]) == set(LOSS_TERMS)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    jsonschema.validate(cfg, schema)
    cfg["codec"]["demo"]["lambdas"]["mel"] = "2"
    with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'number'"):
        jsonschema.validate(cfg, schema)


# ---- resynth on a non-audio file / a 5-minute file ------------------------------------------
def test_resynth_on_a_non_audio_file(model_dir, tmp_path):
    """Before: a traceback."""
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio\n")
    line = one_line_error(cli("resynth", "--model", model_dir, bad, tmp_path / "out.wav"))
    assert line.startswith(f"error: {bad}: unreadable audio"), line
    assert one_line_error(cli("resynth", "--model", model_dir, tmp_path / "nope.wav", tmp_path / "o.wav")) \
        == f"error: {tmp_path / 'nope.wav'}: missing file"
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "zero-length" in one_line_error(cli("resynth", "--model", model_dir, tmp_path / "empty.wav",
                                               tmp_path / "o.wav"))
    assert not (tmp_path / "out.wav").exists() and not (tmp_path / "o.wav").exists()


# Stated bound: peak RSS of `resynth` on 5 minutes <= peak RSS on 20 seconds + 64 MiB. Both runs
# fill whole chunks (5 s), so the difference is what grows with the length: the codes (14 bytes a
# frame, 0.4 MB here) and allocator noise; measured difference ~0-20 MB. Before, the whole file was
# decoded at once: 3.7 GiB on the demo model, 15x its 20-second peak.
RSS_GROWTH_BOUND = 64 * 2**20
MEASURE = ("import resource, sys; from pipeline.__main__ import main; rc = main(sys.argv[1:]); "
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)")


@pytest.mark.slow
def test_resynth_on_a_five_minute_file_in_bounded_memory(model_dir, tmp_path):
    x = np.concatenate([speechlike(10.0, 48000, s) for s in range(30)])
    sf.write(tmp_path / "long.wav", x, 48000, subtype="PCM_16")
    sf.write(tmp_path / "short.wav", x[:20 * 48000], 48000, subtype="PCM_16")
    peak = {}
    for name in ("short", "long"):
        r = subprocess.run([sys.executable, "-c", MEASURE, "resynth", "--model", str(model_dir),
                            str(tmp_path / f"{name}.wav"), str(tmp_path / f"{name}_out.wav")],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "400"})
        assert r.returncode == 0, r.stdout + r.stderr
        peak[name] = int(r.stdout.split("MAXRSS")[1])
    assert sf.info(str(tmp_path / "long_out.wav")).frames == len(x)
    assert peak["long"] <= peak["short"] + RSS_GROWTH_BOUND, peak


# ---- decode with NaN codes, empty arrays, a text file, (2, N) arrays, float codes --------------
def _codes(T=64):
    rng = np.random.default_rng(0)
    return [rng.integers(0, TINY_24K["codebook_size"], T // s) for s in TINY_24K["vq_strides"]]


def test_decode_nan_codes(model_dir, tmp_path):
    """Before: IndexError traceback."""
    c = _codes()
    np.savez(tmp_path / "c.npz", c[0], c[1], np.where(np.arange(len(c[2])) == 5, np.nan, c[2]))
    line = one_line_error(cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav"))
    assert line == f"error: {tmp_path / 'c.npz'}: arr_2 holds NaN/Inf: codes are integer indices in [0, 64)"


def test_decode_empty_arrays(model_dir, tmp_path):
    """Before: 'zero-size array to reduction operation minimum which has no identity'."""
    np.savez(tmp_path / "c.npz", *[np.zeros(0, np.int64)] * 3)
    line = one_line_error(cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav"))
    assert line == f"error: {tmp_path / 'c.npz'}: arr_0 is empty (shape (0,))"


def test_decode_a_text_file(model_dir, tmp_path):
    """Before: numpy's pickle message, naming no expectation."""
    (tmp_path / "c.npz").write_text("1 2 3\n")
    line = one_line_error(cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav"))
    assert line.startswith(f"error: {tmp_path / 'c.npz'}: not an .npz archive (expected numpy.savez"), line


def test_decode_two_row_arrays_is_a_batch_not_one_clip(model_dir, tmp_path):
    """Before: the batch was silently flattened into one clip twice as long. Now each row is its
    own clip: OUT-0.wav, OUT-1.wav, each as long as one row's codes."""
    a, b = _codes(), [c[::-1].copy() for c in _codes()]
    np.savez(tmp_path / "c.npz", *[np.stack([x, y]) for x, y in zip(a, b)])
    r = cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "o.wav").exists()
    y0, y1 = (sf.read(tmp_path / f"o-{k}.wav")[0] for k in (0, 1))
    from pipeline.model.codec import geometry
    assert len(y0) == len(y1) == 64 * geometry(TINY_24K, 48000).hop_target and not np.allclose(y0, y1)
    assert f"-> {tmp_path / 'o-1.wav'}" in r.stdout


def test_decode_float_codes(model_dir, tmp_path):
    """Before: floats silently truncated to integers."""
    np.savez(tmp_path / "c.npz", *[c + 0.5 for c in _codes()])
    line = one_line_error(cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav"))
    assert line.startswith(f"error: {tmp_path / 'c.npz'}: arr_0 is float64, not integers"), line
