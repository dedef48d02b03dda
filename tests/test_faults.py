"""The fault table of issue 8, one test per row: each reproduces the fault as a user meets it and
asserts the user-facing message (one line, no traceback, non-zero exit), or the bound that now
holds. Sections: the data layer (a deleted chunk file, a chunk overwritten with garbage, two
`precompute-shard` processes on one output, a shard folder deleted after the run); config
validation and the inference CLIs (`resynth`, `decode`); the DAG (a shard folder deleted after the
run is rebuilt, a manifest that does not exist, the interpreter in a path with a space), on the
demo built once per session (the `built` fixture) and copies of it. The rows about checkpoints,
preemption and a killed Snakemake are in tests/test_trainer_runs.py and tests/test_workflow.py.
Issue 18's table is the last section: a valid chunk moved from another shard, a shard folder
restored from an older build, held-out utterances that are training ones, a FIFO in a manifest,
a dataset_id beyond int32, a step checkpoint without a part, a partial last line of metrics.jsonl,
a held-out clip shorter than ViSQOL's patch; its row about the logged losses of several processes
is tests/test_distributed.py's test_logged_losses_are_the_whole_batchs (and the 1 vs 2 processes
test's assertions on train/*).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import ROOT, TINY_24K, speechlike, tiny_codec, write_audio, write_manifest
from test_cache import _FirstSegment
from workflow_util import (N_SHARDS, REPO, clone_tree, dry_run, lora_adapters, make_tree, merged_config,
                           parse_jobs, run_env, snakemake)

from pipeline.__main__ import main
from pipeline.data import cache as C
from pipeline.data.precompute import run_shard
from pipeline.data.segments import open_training_cache
from pipeline.model import codecs


# ---- the data layer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_cache(tiny_codec_dir, tmp_path_factory):
    """A two-shard cache of six short clips, and its manifest."""
    d = tmp_path_factory.mktemp("faults")
    rows = []
    for i in range(6):
        write_audio(d / f"a{i}.wav", speechlike(0.6 + 0.2 * i, 48000, seed=i), 48000)
        rows.append({"audio": f"a{i}.wav", "id": f"utt{i}"})
    m = write_manifest(d / "m.jsonl", rows)
    for k in range(2):
        run_shard(m, k, 2, codecs.load(tiny_codec_dir), d / "cache" / f"shard-{k:03d}.zarr")
    return d


@pytest.fixture
def cache(data_cache, tmp_path):
    shutil.copytree(data_cache / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def squash(text: str) -> str:
    """Without whitespace: rich wraps long lines, even inside a path."""
    return "".join(text.split())


def cache_info(capsys, *args) -> tuple:
    rc = main(["cache-info", *map(str, args)])
    out = capsys.readouterr()
    return rc, squash(out.out + out.err)


@pytest.mark.parametrize("array", ["audio", "codes_0", "codes_1", "codes_2", "audio_offsets"])
def test_deleted_chunk_file(cache, capsys, array):
    shard = cache / "shard-000.zarr"
    (shard / array / "c" / "0").unlink()
    rc, out = cache_info(capsys, cache)
    assert rc != 0 and squash(f"{shard}: chunk file {array}/c/0 is missing") in out
    if array != "audio_offsets":
        assert "utterances'utt" in out                     # which utterances it held
    with pytest.raises(C.CacheError, match=f"{shard}: chunk file {array}/c/0 is missing"):
        open_training_cache(sorted(cache.glob("shard-*")), None, preload=False)


def _utterance_in(shard_path, i=0):
    return C.Shard(shard_path).ids[i]


_Reads = _FirstSegment           # the first segment of utterance 0, read in whatever process asks


@pytest.mark.parametrize("how", ["whole file", "one byte"])
def test_chunk_overwritten_with_garbage(cache, capsys, how):
    shard = cache / "shard-000.zarr"
    first = _utterance_in(shard)
    f = shard / "audio" / "c" / "0"
    data = bytearray(f.read_bytes())
    if how == "whole file":
        data = bytearray(np.random.default_rng(0).bytes(len(data)))
    else:
        data[10] ^= 0xFF                                     # inside the first chunk's data
    f.write_bytes(bytes(data))
    sh = open_training_cache([shard, cache / "shard-001.zarr"], None, preload=False)[0]
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        sh.segment(0, 0, sh.geometry.quantum)                 # a training read
    loader = torch.utils.data.DataLoader(_Reads(sh), batch_size=None, num_workers=1)
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        next(iter(loader))                                   # the same in a loader worker (zarrs)
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        sh.utterance(0)                                      # an evaluation read
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}'"):
        C.Shard(shard, preload=True)                         # a preloaded cache
    rc, out = cache_info(capsys, cache, "--check")
    assert rc != 0 and squash(f"{shard}: utterance '{first}'") in out


def test_codes_chunk_overwritten_with_garbage(cache):
    shard = cache / "shard-001.zarr"
    first = _utterance_in(shard)
    f = shard / "codes_2" / "c" / "0"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(C.CacheError, match=f"{shard}: utterance '{first}': codes_2 unreadable"):
        open_training_cache([cache / "shard-000.zarr", shard], None, preload=False)


def test_two_precompute_shard_processes_on_one_output(data_cache, tiny_codec_dir, tmp_path, capsys):
    out = tmp_path / "shard-000.zarr"
    args = ["precompute-shard", "--manifest", str(data_cache / "m.jsonl"), "--shard", "0", "--n-shards", "1",
            "--codec", str(tiny_codec_dir), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lock = Path(str(out) + ".lock")
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.02)
    rc = main(args)                       # the second writer, while the first holds the shard
    msg = squash(capsys.readouterr().out)
    log = first.communicate()[0]
    assert rc != 0 and squash(f"{out}: another writer holds it (pid {first.pid} on") in msg
    assert first.returncode == 0, log
    assert not lock.exists() and not Path(str(out) + ".partial").exists()
    sh = C.Shard(out)
    assert len(sh) == 6 and sh.verify() == []


def test_shard_with_fingerprint_but_missing_arrays_is_incomplete(cache):
    shard = cache / "shard-000.zarr"
    shutil.rmtree(shard / "audio")
    shutil.rmtree(shard / "codes_1")
    with pytest.raises(C.CacheError, match=r"shard-000.zarr: incomplete shard: arrays \['audio', 'codes_1'\] missing"):
        C.open_cache(cache)


def test_shard_folder_deleted_after_the_run(cache, capsys):
    paths = sorted(cache.glob("shard-*.zarr"))
    shutil.rmtree(cache / "shard-001.zarr")
    rc, out = cache_info(capsys, cache)
    assert rc != 0 and squash(f"cache {cache} is incomplete: 1 of its 2 shards missing: {cache / 'shard-001.zarr'}") in out
    with pytest.raises(C.CacheError, match="shard-001.zarr: shard folder missing"):
        open_training_cache(paths, None, preload=False)       # the paths the workflow gives
    with pytest.raises(C.CacheError, match="incomplete: 1 of its 2 shards missing: .*shard-001.zarr"):
        open_training_cache(paths[:1], None, preload=False)


# ---- config and the inference CLIs --------------------------------------------------------
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
    from pipeline.model.codecs import snac as M
    d = tmp_path_factory.mktemp("model")
    codecs.save_model(M.from_codec(tiny_codec(config=dict(TINY_24K, noise=False)), 48000), d)
    return d


# ---- a typo under codec.demo.config / codec.demo.lambdas ---------------------------------------
@pytest.fixture(scope="module")
def code_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("wf") / "code")


@pytest.mark.parametrize("override, key, where", [
    ("codec: {demo: {config: {decoder_dmi: 64}}}\n", "decoder_dmi", "['codec']['demo']['config']"),
    ("codec: {demo: {lambdas: {mle: 2.0}}}\n", "mle", "['codec']['demo']['lambdas']"),
])
@pytest.mark.slow
def test_typo_under_demo_codec_fails_at_parse_time(code_tree, override, key, where):
    """Before: passed the schema; the demo_codec job failed with a traceback after Snakemake had
    deleted the existing codec. Now Snakemake refuses the config, naming the key, before any job."""
    (code_tree / "typo.yaml").write_text(override)
    r = snakemake(code_tree, configfiles=("fast.yaml", "typo.yaml"), extra=("-n",))
    assert r.rc != 0 and not r.jobs and "Building DAG" not in r.out, r.out[-3000:]
    assert f"'{key}' was unexpected" in r.out and f"On instance{where}" in r.out, r.out[-3000:]
    assert not (code_tree / "results").exists()


@pytest.mark.slow
def test_n_fft_larger_than_a_segment_is_refused_at_parse_time(code_tree):
    """Before: `n_ffts: [65536]` with 0.5 s segments was silently clamped and the pipeline ran.
    Now the config is refused before any job, naming the phase's key and the segment's size."""
    (code_tree / "nfft.yaml").write_text("train: {full: {n_ffts: [512, 65536], segment_seconds: 0.5}}\n")
    r = snakemake(code_tree, configfiles=("fast.yaml", "nfft.yaml"), extra=("-n",))
    assert r.rc != 0 and not r.jobs, r.out[-3000:]
    assert "train.full.n_ffts: [65536] exceed a training segment of" in " ".join(r.out.split()), r.out[-3000:]
    assert not (code_tree / "results").exists()


def test_demo_codec_schema_lists_what_the_code_takes():
    """The schema's keys are exactly SNAC's constructor arguments and the loss terms, and the
    embedded config passes it (a wrong type fails)."""
    import jsonschema
    from pipeline.model.codecs.snac import SNAC_KEYS
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


# Stated bound: peak RSS of `resynth` on a long file <= peak RSS on 10 seconds + 64 MiB, whatever
# the length. Both runs fill whole chunks (5 s), so the difference is what grows with the length:
# the codes (14 bytes a frame, 0.2 MB for 2 minutes) and allocator noise; measured difference
# ~0-20 MB. Before, the whole file was decoded at once: 3.7 GiB for 5 minutes on the demo model,
# growing with the length (15x its 20-second peak). The test takes 2 minutes, 12x the short file,
# to stay cheap: whole-file decoding would already show there as hundreds of MB more.
RSS_GROWTH_BOUND = 64 * 2**20
MEASURE = ("import resource, sys; from pipeline.__main__ import main; rc = main(sys.argv[1:]); "
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)")


@pytest.mark.slow
def test_resynth_on_a_long_file_in_bounded_memory(model_dir, tmp_path):
    x = np.concatenate([speechlike(10.0, 48000, s) for s in range(12)])
    sf.write(tmp_path / "long.wav", x, 48000, subtype="PCM_16")
    sf.write(tmp_path / "short.wav", x[:10 * 48000], 48000, subtype="PCM_16")
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
    from pipeline.model.codecs.snac import geometry
    assert len(y0) == len(y1) == 64 * geometry(TINY_24K, 48000).hop_target and not np.allclose(y0, y1)
    assert f"-> {tmp_path / 'o-1.wav'}" in r.stdout


def test_decode_float_codes(model_dir, tmp_path):
    """Before: floats silently truncated to integers."""
    np.savez(tmp_path / "c.npz", *[c + 0.5 for c in _codes()])
    line = one_line_error(cli("decode", "--model", model_dir, tmp_path / "c.npz", tmp_path / "o.wav"))
    assert line.startswith(f"error: {tmp_path / 'c.npz'}: arr_0 is float64, not integers"), line


# ---- the DAG -----------------------------------------------------------------------------------
ADAPTERS, _ = lora_adapters(merged_config(REPO))
TRAINING = ({("train", "phase=warmup"), ("train", "phase=full"), ("evaluate", ""), ("export_final", ""),
             ("report_items", ""), ("all", "")} | {("train_lora", f"phase=lora, adapter={a}") for a in ADAPTERS})


# ---- a shard folder deleted after the run ----------------------------------------------------
def test_deleted_shard_folder_is_rebuilt_with_what_depends_on_it(built, tmp_path):
    """Snakemake alone says "Nothing to be done" (it rebuilds a missing intermediate output only
    when a job downstream must run anyway); now the shard is rebuilt, with a message naming it,
    and what was built from it reruns."""
    root = clone_tree(built[0], tmp_path / "copy")
    shard = "results/cache/shard-001.zarr"
    shutil.rmtree(root / shard)

    r = dry_run(root)
    assert f"{shard} is missing although results/precompute/summary.json, built from it, exists" in r.out, \
        r.out[-3000:]
    assert set(r.keys()) == {("precompute_shard", "cachedir=cache, shard=001"),
                             ("precompute_summary", "sdir=precompute")} | TRAINING, r.keys()
    job = next(j for j in r.jobs if j["rule"] == "precompute_shard")
    assert job["output"] == shard and job["reason"] == "Forced execution", job

    # the real run rebuilds it (the summary stands for everything downstream here)
    r = snakemake(root, ["results/precompute/summary.json"], timeout=600)
    assert r.rc == 0, r.out[-4000:]
    assert {(j["rule"], j.get("wildcards", "")) for j in r.jobs} == {
        ("precompute_shard", "cachedir=cache, shard=001"), ("precompute_summary", "sdir=precompute")}
    assert (root / shard / "zarr.json").is_file()
    summary = json.loads((root / "results/precompute/summary.json").read_text())
    assert [s["shard"] for s in summary["shards"]] == [f"shard-{k:03d}.zarr" for k in range(N_SHARDS)]
    assert summary["accepted"] + summary["rejected"] == summary["lines"]
    # nothing missing any more: no message, and only what depends on the rebuilt shard is left
    r = dry_run(root)
    assert "is missing although" not in r.out
    assert set(r.keys()) == TRAINING


# ---- --config manifest=/nonexistent.jsonl when results exist --------------------------------------
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_nonexistent_manifest_fails_even_when_results_exist(built, dry):
    """Raised inside an input function, the error was swallowed whenever the outputs existed
    (`snakemake results/phase11/final.pt`: "Nothing to be done", rc 0; the default target
    happened to evaluate one such function and fail); it is now checked at parse time."""
    root, _ = built
    r = snakemake(root, ["results/phase11/final.pt"],
                  extra=(("-n",) if dry else ()) + ("--config", "manifest=/nonexistent.jsonl"))
    assert r.rc != 0, r.out[-3000:]
    assert "Nothing to be done" not in r.out and not r.jobs, r.out[-3000:]
    assert "train manifest '/nonexistent.jsonl' does not exist (config key manifest)" in r.out, r.out[-3000:]


# ---- the interpreter inside a path with a space -------------------------------------------------
@pytest.fixture(scope="module")
def spaced_python(tmp_path_factory) -> Path:
    """A venv in a folder whose name has a space, seeing this environment's packages."""
    d = tmp_path_factory.mktemp("interp") / "my envs" / "phase 11"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(d)
    py = d / "bin" / "python"
    site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    import site as this_site
    (Path(site) / "parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in this_site.getsitepackages()))
    return py


@pytest.mark.slow
def test_interpreter_in_a_path_with_a_space_runs_every_rule(spaced_python, tmp_path):
    """Every rule runs `python -m pipeline` with the interpreter path quoted: `-n` passed before,
    then every job failed with `/usr/bin/bash: line 1: /tmp/my: Is a directory`."""
    root = make_tree(tmp_path / "tree")
    cmd = [str(spaced_python), "-m", "snakemake", "data/demo/manifest.jsonl", "--cores", "2",
           "--configfile", "fast.yaml"]
    p = subprocess.run(cmd, cwd=root, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    assert (root / "data/demo/manifest.jsonl").is_file() and (root / "data/demo/heldout.jsonl").is_file()

    # every other rule's command, as it would run (the corpus exists now, so the DAG is complete)
    p = subprocess.run(cmd[:3] + ["--cores", "2", "--configfile", "fast.yaml", "-n", "-p"], cwd=root,
                       env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    jobs = [j for j in parse_jobs(p.stdout) if j["rule"] != "all"]
    shells = [l for l in p.stdout.splitlines() if l.startswith("Shell command: ") and l != "Shell command: None"]
    rules = {j["rule"] for j in jobs}
    assert rules == {"demo_codec", "precompute_shard", "precompute_summary", "train", "train_lora", "evaluate",
                     "export_final", "report_items"}, rules
    assert len(shells) == len(jobs)
    quoted = f"'{spaced_python}' -m pipeline "
    assert all(quoted in s for s in shells), [s for s in shells if quoted not in s][:2]


# ==== issue 18: the cache verified where it is read, and the last hostile inputs ===================
# One test per fault of the issue, each reproducing it as a user meets it. The row about the logged
# train/loss of several processes is test_distributed.py's test_logged_losses_are_the_whole_batchs.
def test_valid_chunk_moved_from_another_shard_fails_the_first_read(cache):
    """Before: `cp shard-001.zarr/audio/c/0 shard-000.zarr/audio/c/0` passed the chunk's own crc32c
    and a phase with preload: false trained on audio that did not match its codes (only
    `cache-info --check` saw it). Now each audio chunk's decoded content is checked against the
    checksum recorded for its position, on every read path."""
    dst, src = cache / "shard-000.zarr", cache / "shard-001.zarr"
    shutil.copy2(src / "audio" / "c" / "0", dst / "audio" / "c" / "0")
    sh = open_training_cache([dst, src], None, preload=False)[0]     # opening stats files only
    first = sh.ids[0]
    where = f"{dst}: utterance '{first}': audio chunk 0"
    with pytest.raises(C.CacheError, match=where):
        sh.segment(0, 0, sh.geometry.quantum)                        # a training read
    loader = torch.utils.data.DataLoader(_Reads(sh), batch_size=None, num_workers=1)
    with pytest.raises(C.CacheError, match=where):
        next(iter(loader))                                           # in a loader worker (zarrs)
    with pytest.raises(C.CacheError, match=f"{dst}: utterance '{first}'"):
        sh.utterance(0)                                              # an evaluation read
    with pytest.raises(C.CacheError, match=f"{dst}: utterance '{first}'"):
        open_training_cache([dst, src], None, preload=True)          # a preloaded cache


def _restore(backup: Path, dest: Path) -> None:
    shutil.rmtree(dest)
    subprocess.run(["cp", "-a", str(backup), str(dest)], check=True)


def test_shard_folder_restored_from_an_older_build_is_rebuilt(built, tmp_path):
    """Before: a row's dataset_id changed, its shard rebuilt, then the old shard folder put back
    with `cp -a`: Snakemake's records said the shard was current, so `-n` reran only what reads it,
    and training read the stale shard. Now each shard records the digest of the rows it was built
    from; one that does not match the manifest's rows is rebuilt, with a warning naming it."""
    from pipeline.data.manifest import parse_manifest, shard_of
    root = clone_tree(built[0], tmp_path / "copy")
    manifest = root / "data/demo/manifest.jsonl"
    row = parse_manifest(manifest).rows[6]
    shard = f"results/cache/shard-{shard_of(row.id, N_SHARDS):03d}.zarr"
    subprocess.run(["cp", "-a", str(root / shard), str(tmp_path / "backup.zarr")], check=True)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[6]["dataset_id"] = lines[6].get("dataset_id", 0) + 3
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = snakemake(root, [shard], timeout=600)                        # the shard rebuilt alone
    assert r.rc == 0 and [j["rule"] for j in r.jobs] == ["precompute_shard"], r.out[-3000:]
    _restore(tmp_path / "backup.zarr", root / shard)
    # and another shard as an older version of the pipeline wrote it: no record of its rows
    old = next(f"results/cache/shard-{k:03d}.zarr" for k in range(N_SHARDS) if f"shard-{k:03d}" not in shard)
    meta = json.loads((root / old / "zarr.json").read_text())
    del meta["attributes"]["rows"]
    (root / old / "zarr.json").write_text(json.dumps(meta))

    r = dry_run(root)
    out = " ".join(r.out.split())
    assert f"{shard} was built from other manifest rows than the current ones" in out, r.out[-3000:]
    assert f"{old} has no record of the manifest rows it was built from" in out, r.out[-3000:]
    jobs = {j["output"]: j["reason"] for j in r.jobs if j["rule"] == "precompute_shard"}
    assert jobs == {shard: "Forced execution", old: "Forced execution"}, r.out[-3000:]
    assert {("train", "phase=warmup"), ("evaluate", "")} <= set(r.keys())


@pytest.mark.slow
def test_heldout_utterances_in_the_training_manifests_are_refused_at_parse_time(code_tree, tmp_path):
    """Before: a held-out manifest holding three training utterances ran to the end with no word,
    and the evaluation scored the model on what it trained on. Now the DAG is refused before any
    job, naming them: same id, or the same audio file written another way."""
    d = tmp_path / "corpus"
    (d / "held").mkdir(parents=True)
    rows = [{"audio": f"a{i}.wav", "id": f"utt{i}"} for i in range(8)]
    write_manifest(d / "train.jsonl", rows)
    write_manifest(d / "held" / "heldout.jsonl", [
        {"audio": "../a1.wav", "id": "utt1"},                       # same id, same file
        {"audio": "h0.wav", "id": "utt4"},                          # same id
        {"audio": "../sub/../a6.wav", "id": "other"},               # same file
        {"audio": "h1.wav", "id": "h1"}])
    (code_tree / "overlap.yaml").write_text(f"manifest: {d / 'train.jsonl'}\nheldout_manifest: {d / 'held/heldout.jsonl'}\n")
    r = snakemake(code_tree, configfiles=("fast.yaml", "overlap.yaml"), extra=("-n",))
    out = " ".join(r.out.split())
    assert r.rc != 0 and not r.jobs, out[-3000:]
    assert "3 held-out utterances are also training utterances (same id or same audio file): " \
           "'utt1', 'utt4', 'other'" in out, out[-3000:]


def _no_hang(fn, fifo: Path, seconds: float = 60.0):
    """fn() in a thread; if it is still blocked on the FIFO after `seconds`, unblock it by opening
    the writing end, and fail."""
    import threading
    box = {}
    th = threading.Thread(target=lambda: box.update(out=fn()), daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        with open(fifo, "wb"):
            pass
        th.join(30)
        pytest.fail(f"blocked on the FIFO {fifo} for {seconds} s")
    return box["out"]


@pytest.fixture
def fifo_manifest(tmp_path):
    write_audio(tmp_path / "ok.wav", speechlike(0.8, 48000, seed=3), 48000)
    os.mkfifo(tmp_path / "pipe.wav")
    return write_manifest(tmp_path / "m.jsonl", [{"audio": "ok.wav", "id": "ok"}, {"audio": "pipe.wav", "id": "pipe"}])


def test_fifo_in_a_manifest_is_rejected_without_being_opened(fifo_manifest, tiny_codec_dir, tmp_path):
    """Before: the shard job (and demo_codec before it) hung forever opening the FIFO, with no
    output. Now anything but a regular file is a reject with its reason, never opened."""
    from pipeline.data import audio as A
    from pipeline.training.democodec import load_corpus
    fifo = tmp_path / "pipe.wav"
    stats = _no_hang(lambda: run_shard(fifo_manifest, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "s.zarr"), fifo)
    assert stats["accepted"] == 1 and stats["rejected"] == 1
    assert C.Shard(tmp_path / "s.zarr").rejects[0]["reason"] == "not a regular file (a FIFO)"
    assert len(_no_hang(lambda: load_corpus(fifo_manifest, 24000), fifo)) == 1
    with pytest.raises(A.AudioError, match=r"not a regular file \(a character device\)"):
        A.read_mono("/dev/zero")


def test_dataset_id_beyond_the_caches_range_is_rejected_at_parse_time(tiny_codec_dir, tmp_path):
    """Before: `dataset_id: 2**40` passed validation and the shard job crashed with an
    OverflowError after it had encoded the whole shard. Now the line is a reject, with the range."""
    from pipeline.data.manifest import parse_manifest
    write_audio(tmp_path / "a.wav", speechlike(0.8, 48000, seed=3), 48000)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav", "id": "ok", "dataset_id": 2**31 - 1},
                                             {"audio": "a.wav", "id": "big", "dataset_id": 2**40}])
    parsed = parse_manifest(m)
    assert [r.id for r in parsed.rows] == ["ok"]
    assert parsed.rejects == [{"manifest": str(m), "line": 2, "id": "big", "audio": "a.wav",
                               "reason": "`dataset_id` must be an integer in 0..2147483647 (the cache stores int32)"}]
    stats = run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "s.zarr")
    assert stats["accepted"] == 1 and C.Shard(tmp_path / "s.zarr").table["dataset_id"].tolist() == [2**31 - 1]


@pytest.mark.parametrize("part", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_step_checkpoint_without_a_part_falls_back_to_the_one_before(tmp_path, capsys, part):
    """Before: a step checkpoint without optimizer.pt gave `KeyError: 'optimizer'` on every rerun.
    Now a checkpoint missing a part a resume needs is skipped like a truncated one."""
    from pipeline.training import checkpoint
    parts = {"optimizer": {"state": {}}, "scheduler": {"last_epoch": 1}, "rng": {"torch": torch.get_rng_state()}}
    for step in (2, 4):
        checkpoint.save(tmp_path, step, {"w": torch.ones(2) * step}, parts, {"run": "r", "step": step})
    (tmp_path / "step_0000004" / part).unlink()
    ck = checkpoint.newest_readable(tmp_path, "r")
    assert ck.state["step"] == 2 and set(ck.parts) == {"optimizer", "scheduler", "rng"}
    assert squash(f"skipping checkpoint {tmp_path / 'step_0000004'}: it does not read") in squash(capsys.readouterr().out)


def test_partial_last_line_of_metrics_is_dropped_and_the_resume_goes_on(tmp_path, capsys):
    """Before: a kill mid-write left a partial last line in metrics.jsonl and every resume failed
    with `Expecting ',' delimiter`, naming no file. Now the line is dropped with a warning naming
    the file."""
    from pipeline.training.train import truncate_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "tr')
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert squash(f"{path}: line 4 is not JSON") in squash(capsys.readouterr().out)


def test_heldout_clip_shorter_than_visqols_patch_is_scored_on_what_applies(tiny_codec_dir, tmp_path, monkeypatch):
    """Before: a 0.1-0.2 s held-out clip (min_seconds: 0.05) stopped `evaluate` after every phase
    had trained (`Reference spectrum size (7) smaller than minimum patch size (45)`), naming no
    utterance, and left a .tmp file. Now ViSQOL is missing for that clip (null, and counted in
    eval.json), the other metrics are scored, and a failed evaluation leaves no .tmp behind."""
    from pipeline.evaluation import evaluate as E
    write_audio(tmp_path / "long.wav", speechlike(1.2, 48000, seed=4), 48000)
    write_audio(tmp_path / "short.wav", speechlike(0.15, 48000, seed=5), 48000)
    m = write_manifest(tmp_path / "held.jsonl", [{"audio": "long.wav", "id": "long"}, {"audio": "short.wav", "id": "short"}])
    run_shard(m, 0, 1, codecs.load(tiny_codec_dir), tmp_path / "held/shard-000.zarr", {"min_seconds": 0.05})
    out = tmp_path / "out" / "eval.json"
    r = E.evaluate(tiny_codec_dir, [tmp_path / "held/shard-000.zarr"], {}, out, {"n_ffts": [256, 512], "bootstrap": 100})
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "out/eval_utterances.jsonl").read_text().splitlines())}
    assert rows["short"]["visqol"] is None and rows["long"]["visqol"] is not None
    assert all(rows["short"][k] is not None for k in ("lsd_db", "mel_l1", "si_sdr_db"))
    assert r["missing"] == {"baseline": {"visqol": 1}} and r["models"]["baseline"]["visqol"] == round(rows["long"]["visqol"], 4)
    assert not list((tmp_path / "out").glob("*.tmp"))

    def broken(*a, **k):
        raise RuntimeError("a metric failed")
    monkeypatch.setattr(E, "evaluate_pair", broken)
    with pytest.raises(RuntimeError, match="a metric failed"):
        E.evaluate(tiny_codec_dir, [tmp_path / "held/shard-000.zarr"], {}, tmp_path / "out2/eval.json",
                   {"n_ffts": [256, 512], "bootstrap": 100})
    assert not list((tmp_path / "out2").glob("*.tmp"))
