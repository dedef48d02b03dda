"""End-to-end tests of the Snakemake workflow: the demo DAG with a tiny config, reruns that
change nothing, what each kind of change invalidates, config validation, and resume of a
training job after SIGKILL.

Every run happens in a temporary copy of Snakefile, workflow/, config/ and pipeline/ (never in
the repository). One module-scoped fixture builds the whole demo once (`rule all`: final.pt,
eval.json and both precompute summaries); invalidation tests work on copies of that tree with
mtimes and .snakemake metadata preserved, and read what would run from `snakemake -n`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.data.manifest import parse_manifest, shard_of
from workflow_util import (N_HELDOUT, N_SHARDS, N_TRAIN, REPO, STEPS, clone_tree, dry_run,
                           dry_run_with, lora_adapters, make_tree, merged_config, mtimes, run_env,
                           snakemake, snakemake_cmd)

METRICS = ("visqol", "lsd_lo_db", "lsd_hi_db", "lsd_db", "mel_l1", "mrstft", "si_sdr_db")
STEP_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
MANIFEST = "data/demo/manifest.jsonl"



def shard_job(k: int) -> tuple:
    return ("precompute_shard", f"cachedir=cache, shard={k:03d}")


# (rule, wildcards) of every job of the demo DAG; the LoRA adapters come from the config
SHARD_JOBS = {shard_job(k) for k in range(N_SHARDS)}
HELDOUT_SHARD = ("precompute_shard", "cachedir=cache_heldout, shard=000")
TRAIN_SUMMARY = ("precompute_summary", "sdir=precompute")
HELDOUT_SUMMARY = ("precompute_summary", "sdir=precompute/heldout")
ADAPTERS, FINAL_ADAPTER = lora_adapters(merged_config(REPO))
LORA_JOBS = {("train_lora", f"phase=lora, adapter={a}") for a in ADAPTERS}
AFTER_FULL = LORA_JOBS | {("evaluate", ""), ("export_final", ""), ("report_items", ""), ("all", "")}
TRAINING = {("train", "phase=warmup"), ("train", "phase=full")} | AFTER_FULL
ALL_JOBS = ({("demo_data", ""), ("demo_codec", ""), HELDOUT_SHARD, TRAIN_SUMMARY, HELDOUT_SUMMARY}
            | SHARD_JOBS | TRAINING)
PHASE_DIRS = ["warmup", "full", *(f"lora/{a}" for a in ADAPTERS)]


def exactly_once(keys: Counter) -> set:
    assert all(n == 1 for n in keys.values()), keys
    return set(keys)


# ---- the one full build: the `built` fixture (conftest.py), shared with tests/test_slurm.py ----
@pytest.fixture
def copy_of(built, tmp_path):
    """A copy of the built tree to change things in (the fixture's tree stays untouched)."""
    return clone_tree(built[0], tmp_path / "copy")


# ---- 1. the demo run ------------------------------------------------------------------------
def test_full_demo_run_outputs(built):
    root, run = built
    res = root / "results"

    # every job of the DAG ran, once, each with a log and a benchmark
    assert exactly_once(run.keys()) == ALL_JOBS
    for j in run.jobs:
        if j["rule"] == "all":
            continue
        for kind in ("log", "benchmark"):
            assert kind in j, f"{j['rule']} ({j.get('wildcards', '')}) declares no {kind}"
            p = root / j[kind]
            assert p.is_file() and p.stat().st_size > 0, p
        assert j["log"].startswith("results/logs/") and j["benchmark"].startswith("results/benchmarks/")
    assert len(list((res / "benchmarks").rglob("*.tsv"))) == len(ALL_JOBS) - 1

    # final.pt: weights_only-safe, loadable, identical to model.safetensors beside it and to the
    # output (LoRA merged) of the adapter the config names as final
    from pipeline.model.codecs import load_model
    from pipeline.model.codecs.snac import FORMAT
    source = f"lora/{FINAL_ADAPTER}" if FINAL_ADAPTER else "full"
    blob = torch.load(res / "phase11/final.pt", map_location="cpu", weights_only=True)
    assert set(blob) == {"config", "state_dict"}
    assert blob["config"]["format"] == FORMAT and blob["config"]["target_rate"] == 48000
    assert not [k for k in blob["state_dict"] if "lora_" in k], "LoRA not merged into final.pt"
    from_pt, from_dir = load_model(res / "phase11/final.pt"), load_model(res / "phase11")
    beside = load_file(res / "phase11/model.safetensors")
    source_out = load_file(res / "phase11" / source / "model.safetensors")
    cfg = json.loads((res / "phase11/config.json").read_text())
    assert cfg["format"] == FORMAT
    for sd in (from_pt.state_dict(), from_dir.state_dict(), beside, source_out):
        assert set(sd) == set(blob["state_dict"])
        for k, v in blob["state_dict"].items():
            assert torch.equal(sd[k], v), k

    # eval.json: baseline, warmup, full, final (+ any adapter not merged into final), all metrics
    ev = json.loads((res / "phase11/eval.json").read_text())
    assert set(ev["models"]) == {"baseline", "warmup", "full", "final"} | {
        f"lora:{a}" for a in ADAPTERS if a != FINAL_ADAPTER}
    assert ev["utterances"] == N_HELDOUT
    for name, m in ev["models"].items():
        assert set(m) == set(METRICS), name
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values()), (name, m)

    # LoRA adapters: adapter tensors only, rank/alpha/targets in the metadata
    cfg = merged_config(root)
    own = (cfg.get("lora") or {}).get("adapters") or {}
    for a in ADAPTERS:     # train.lora.lora, with the adapter's own overrides if it has any
        lora_cfg = {**cfg["train"]["lora"]["lora"], **own.get(a, {}).get("lora", {})}
        with safe_open(str(res / f"phase11/lora/{a}/lora_weights.safetensors"), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        assert keys and all("lora_" in k for k in keys), keys
        assert int(meta["rank"]) == lora_cfg["rank"] and float(meta["alpha"]) == lora_cfg["alpha"]
        assert json.loads(meta["targets"]) == lora_cfg["targets"]

    # precompute summaries: every manifest line accounted for
    for sub, n in (("precompute", N_TRAIN), ("precompute/heldout", N_HELDOUT)):
        s = json.loads((res / sub / "summary.json").read_text())
        assert s["lines"] == n and s["accepted"] + s["rejected"] == s["lines"], s
        assert (res / sub / "rejects.jsonl").is_file()
    assert sum(1 for _ in open(res / "precompute/rejects.jsonl")) == \
        json.loads((res / "precompute/summary.json").read_text())["rejected"]

    # each phase: outputs, metrics.jsonl, complete step checkpoints
    for phase in PHASE_DIRS:
        d = res / "phase11" / phase
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records]
        assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps
        assert "val/loss" in records[-1]
        cks = sorted((d / "checkpoints").iterdir())
        assert cks and all(re.fullmatch(r"step_\d{7}", c.name) for c in cks), cks   # no .tmp-* left
        assert cks[-1].name == f"step_{STEPS:07d}"
        for c in cks:
            for f in STEP_FILES:
                assert (c / f).is_file(), c / f
            assert json.loads((c / "trainer_state.json").read_text())["step"] == int(c.name[5:])
            for f in ("optimizer.pt", "scheduler.pt", "rng.pt"):
                torch.load(c / f, weights_only=True)


# ---- 2. nothing changed, nothing to do ------------------------------------------------------
def test_rerun_with_nothing_changed_does_nothing(built):
    root, _ = built
    before = mtimes(root)
    for _ in range(2):                     # a parse must not write anything the next one sees
        r = dry_run(root)
        assert not r.jobs and "Nothing to be done" in r.out, r.out[-3000:]
    r = snakemake(root, extra=("--quiet", "progress"))
    assert r.rc == 0 and "Nothing to be done" in r.out, r.out[-3000:]
    assert mtimes(root) == before


# ---- 3. invalidation ------------------------------------------------------------------------
def _manifest_rows(root):
    return parse_manifest(root / MANIFEST).rows


def _rewrite_manifest(root, edit, keep_mtime=False):
    """Apply edit(list of line dicts) to the training manifest; optionally keep its old mtime."""
    p = root / MANIFEST
    st = p.stat()
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    edit(rows)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if keep_mtime:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_touched_or_changed_audio_file_reruns_only_its_shard(copy_of):
    """Audio files are not inputs of their shard job (a million of them would cost Snakemake
    minutes): a digest of each file's size and mtime is a param of its shard. So a touched file
    reruns its shard (whatever its size: before, Snakemake compared checksums of inputs up to
    1 MB and did not), and so does a changed, deleted or re-created one. A file replaced in place
    with the same size and its old mtime restored is not seen: the README tells users to touch it."""
    root = copy_of
    row = _manifest_rows(root)[4]
    k = shard_of(row.id, N_SHARDS)
    wav = Path(row.audio)
    wav = wav if wav.is_absolute() else root / wav
    expected = {shard_job(k), TRAIN_SUMMARY} | TRAINING

    def check(r):
        assert exactly_once(r.keys()) == expected
        job = next(j for j in r.jobs if j["rule"] == "precompute_shard")
        assert f"shard={k:03d}" in job["wildcards"]
        assert job["output"] == f"results/cache/shard-{k:03d}.zarr"
        assert job["reason"].startswith("Params have changed"), job["reason"]
        assert ".wav" not in job["input"], job["input"]

    st = wav.stat()
    # new content (one LSB, same format and size), its old mtime put back: not seen
    x, sr = sf.read(wav, dtype="int16")
    subtype = sf.info(wav).subtype
    x[len(x) // 2] ^= 1
    sf.write(wav, x, sr, subtype=subtype)
    assert wav.stat().st_size == st.st_size
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not dry_run(root).jobs
    # ... until it is touched, as the README says; a plain rewrite changes the mtime itself
    os.utime(wav)
    check(dry_run(root))
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    sf.write(wav, x, sr, subtype=subtype)
    check(dry_run(root))
    # deleted (the shard would reject the line as a missing file), then back
    data = wav.read_bytes()
    wav.unlink()
    check(dry_run(root))
    wav.write_bytes(data)
    check(dry_run(root))


def _edit_dataset_id(rows, i=6):
    rows[i]["dataset_id"] = rows[i].get("dataset_id", 0) + 3
    rows[i]["text"] = "edited"


def _append_utterance(root):
    src = _manifest_rows(root)[3]
    shutil.copy(src.audio if os.path.isabs(src.audio) else root / src.audio,
                root / "data/demo/audio/added-utt.wav")
    return {"audio": "audio/added-utt.wav", "id": "added-utt", "text": "new", "dataset_id": 0}


def test_edited_manifest_line_reruns_only_its_shard(copy_of):
    root = copy_of
    k = shard_of(_manifest_rows(root)[6].id, N_SHARDS)
    _rewrite_manifest(root, _edit_dataset_id)
    keys = exactly_once(dry_run(root).keys())
    assert ("demo_codec", "") not in keys          # the codec does not retrain for a manifest edit
    assert keys == {shard_job(k), TRAIN_SUMMARY} | TRAINING


def test_appended_utterance_reruns_only_its_shard(copy_of):
    root = copy_of
    new = _append_utterance(root)
    _rewrite_manifest(root, lambda rows: rows.append(new))
    k = shard_of(new["id"], N_SHARDS)
    keys = exactly_once(dry_run(root).keys())
    assert ("demo_codec", "") not in keys          # the codec does not retrain for a manifest edit
    assert keys == {shard_job(k), TRAIN_SUMMARY} | TRAINING


def test_edited_manifest_line_changes_only_its_shard_params(copy_of):
    """The shard-level mechanism alone (a digest of the shard's rows as a param): the edited
    manifest keeps its old mtime, so only the param can make the shard rerun."""
    root = copy_of
    k = shard_of(_manifest_rows(root)[6].id, N_SHARDS)
    _rewrite_manifest(root, _edit_dataset_id, keep_mtime=True)
    r = dry_run(root)
    assert exactly_once(r.keys()) == {shard_job(k), TRAIN_SUMMARY} | TRAINING
    job = next(j for j in r.jobs if j["rule"] == "precompute_shard")
    assert job["reason"].startswith("Params have changed"), job["reason"]


def test_appended_utterance_changes_only_its_shard_params(copy_of):
    """Same isolation as above: the new line changes the digests (rows, audio) of its shard alone;
    no audio file is an input of any shard job."""
    root = copy_of
    new = _append_utterance(root)
    _rewrite_manifest(root, lambda rows: rows.append(new), keep_mtime=True)
    k = shard_of(new["id"], N_SHARDS)
    r = dry_run(root)
    assert exactly_once(r.keys()) == {shard_job(k), TRAIN_SUMMARY} | TRAINING
    job = next(j for j in r.jobs if j["rule"] == "precompute_shard")
    assert job["reason"].startswith("Params have changed"), job["reason"]
    assert ".wav" not in job["input"], job["input"]


def test_phase_hyperparameter_reruns_that_phase_and_later(built):
    root, _ = built
    r = dry_run_with(root, "train: {full: {lr: 0.0001}}\n")
    assert exactly_once(r.keys()) == {("train", "phase=full")} | AFTER_FULL
    job = next(j for j in r.jobs if j["rule"] == "train")
    assert job["reason"].startswith("Params have changed"), job["reason"]


def test_eval_settings_rerun_training_only_where_select_is_rank_sum(built):
    """eval.n_ffts / eval.lsd_floor_db change the evaluation; a phase with select: rank_sum scores
    its checkpoints with them (`--metrics`), so for that phase (only) they are params."""
    root, _ = built
    r = dry_run_with(root, "eval: {lsd_floor_db: -60}\n")
    assert exactly_once(r.keys()) == {("evaluate", ""), ("export_final", ""), ("report_items", ""), ("all", "")}
    r = dry_run_with(root, "train: {full: {select: rank_sum}}\neval: {lsd_floor_db: -60}\n", extra=("-p",))
    assert exactly_once(r.keys()) == {("train", "phase=full")} | AFTER_FULL
    shells = [l for l in r.out.splitlines() if " train --phase " in l]
    assert len(shells) == 1 + len(ADAPTERS), shells
    assert all(("--metrics" in l) == (" train --phase full " in l) for l in shells), shells
    assert '"lsd_floor_db": -60' in next(l for l in shells if " train --phase full " in l)


def test_codec_change_reruns_every_shard(built):
    root, _ = built
    r = dry_run_with(root, "codec: {demo: {steps: 21}}\n")
    assert exactly_once(r.keys()) == ALL_JOBS - {("demo_data", "")}


# ---- 4. config validation -------------------------------------------------------------------
@pytest.fixture(scope="module")
def code_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("wf") / "code")


def _fails_before_any_job(root, r):
    assert r.rc != 0, r.out[-3000:]
    assert not r.jobs and "Job stats" not in r.out, r.out[-3000:]
    assert not (root / "results").exists() and not (root / "data").exists()
    assert r.seconds < 60


@pytest.mark.slow
def test_misspelt_top_level_key_fails_at_once(code_tree):
    r = snakemake(code_tree, extra=("-n", "--config", "manifst=x"))
    _fails_before_any_job(code_tree, r)
    assert "manifst" in r.out and "Building DAG" not in r.out, r.out[-3000:]


@pytest.mark.slow
def test_misspelt_nested_key_fails_at_once(code_tree):
    (code_tree / "typo.yaml").write_text("train: {warmup: {lrr: 0.001}}\n")
    r = snakemake(code_tree, configfiles=("fast.yaml", "typo.yaml"), extra=("-n",))
    _fails_before_any_job(code_tree, r)
    assert "'lrr'" in r.out and "Building DAG" not in r.out, r.out[-3000:]
    assert "['train']['warmup']" in r.out, r.out[-3000:]


@pytest.mark.slow
def test_missing_manifest_fails_naming_it(code_tree):
    r = snakemake(code_tree, extra=("-n", "--config", "manifest=nowhere/train.jsonl"))
    _fails_before_any_job(code_tree, r)
    assert "nowhere/train.jsonl" in r.out and "does not exist" in r.out, r.out[-3000:]
    assert "(config key manifest)" in r.out, r.out[-3000:]


@pytest.mark.slow
def test_bad_group_pattern_in_a_late_phase_fails_before_any_job(code_tree):
    """Parameter groups are checked against the model's parameter names at parse time, so a typo
    in the LoRA phase does not wait for warmup and full to train first."""
    (code_tree / "groups.yaml").write_text('lora: {adapters: {default: {groups: [{pattern: "*.lroa_*"}]}}}\n')
    r = snakemake(code_tree, configfiles=("fast.yaml", "groups.yaml"), extra=("-n",))
    _fails_before_any_job(code_tree, r)
    assert "'*.lroa_*' matches no parameter" in r.out and "lora.adapters.default" in r.out, r.out[-3000:]


# ---- 5. a killed phase, runtime knobs, a forced rerun -------------------------------------
RESUME_YAML = "train: {full: {steps: 16, ckpt_every: 4, val_every: 8}}\n"
KNOBS_YAML = ("train: {defaults: {num_workers: 1, log_every: 1}}\n"      # runtime knobs only
              "precompute: {device: cpu, batch_seconds: 8, window_seconds: 30}\n")
FULL = "results/phase11/full/model.safetensors"


def _step_dirs(ck: Path, since: float = 0.0) -> list:
    """Step numbers of the checkpoints in ck written after `since` (a time.time())."""
    return sorted(int(d.name[5:]) for d in ck.glob("step_*") if d.stat().st_mtime >= since) if ck.is_dir() else []


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_killed_phase_resumes_under_new_runtime_knobs_and_forcerun_retrains(built, tmp_path):
    """Snakemake is SIGKILLed while `full` trains: the trainer does not outlive it (it writes a
    checkpoint and exits); after --unlock, a rerun with other runtime knobs (num_workers,
    log_every) and --rerun-incomplete resumes from that checkpoint, reruns nothing else, and ends
    with the weights of the same phase run again from step 0 by --forcerun."""
    root = clone_tree(built[0], tmp_path / "resume")
    (root / "resume.yaml").write_text(RESUME_YAML)
    (root / "knobs.yaml").write_text(KNOBS_YAML)
    cfgs = ("fast.yaml", "resume.yaml")
    assert not dry_run(root, [FULL], ("fast.yaml", "knobs.yaml")).jobs      # knobs alone rerun nothing
    assert exactly_once(dry_run(root, [FULL], cfgs).keys()) == {("train", "phase=full")}

    ck = root / "results/phase11/full/checkpoints"
    with open(tmp_path / "killed.out", "w") as log:
        started = time.time() - 1.0      # the built tree's own finished checkpoints are older
        p = subprocess.Popen(snakemake_cmd([FULL], cfgs), cwd=root, env=run_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not (_step_dirs(ck, started) and _step_dirs(ck, started)[-1] >= 4):
                assert p.poll() is None, "the run ended before it could be killed: raise steps"
                assert time.monotonic() < deadline, "no step checkpoint >= 4 in time"
                time.sleep(0.02)
            trainer = int(re.search(r"pid (\d+)", (ck.parent / ".lock").read_text())[1])
            p.kill()                               # Snakemake alone: its job is orphaned
            p.wait(timeout=60)
            assert _wait_gone(trainer, 90), "the trainer outlived the Snakemake that started it"
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    newest = _step_dirs(ck)[-1]
    assert 4 <= newest < 16 and not (root / FULL).exists()

    r = snakemake(root, [FULL], cfgs, ("--unlock",))
    assert r.rc == 0, r.out[-3000:]
    r = snakemake(root, [FULL], (*cfgs, "knobs.yaml"), ("--rerun-incomplete",), timeout=600)
    assert r.rc == 0, r.out[-4000:]
    assert exactly_once(r.keys()) == {("train", "phase=full")}
    log = (root / "results/logs/train/full.log").read_text()
    m = re.search(r"resuming\s+full\s+from\s+(\S+)\s+\(step\s+(\d+)\s+of\s+(\d+)\)", log)
    assert m, log[-3000:]
    assert m.group(1).endswith(f"step_{newest:07d}") and int(m.group(2)) == newest and int(m.group(3)) == 16
    steps = [json.loads(l)["step"] for l in (root / "results/phase11/full/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16           # none twice
    assert list(range(newest + 1, 17)) == [s for s in steps if s > newest]   # log_every 1 took effect
    resumed = load_file(root / FULL)

    # forced: the finished run trains again from step 0 and ends with the same weights
    r = snakemake(root, [FULL], cfgs, ("--forcerun", FULL), timeout=600)
    assert r.rc == 0, r.out[-4000:]
    log = (root / "results/logs/train/full.log").read_text()
    assert "resuming" not in log and "forced rerun" in log, log[-3000:]
    again = load_file(root / FULL)
    assert set(again) == set(resumed) and all(torch.equal(again[k], resumed[k]) for k in again)


def test_final_pt_merges_the_named_adapter_or_none(built):
    """`lora.final` picks the adapter merged into final.pt; null exports the full phase."""
    root, _ = built
    for final, source in ((FINAL_ADAPTER, f"results/phase11/lora/{FINAL_ADAPTER}/model.safetensors"),
                          (None, "results/phase11/full/model.safetensors")):
        r = dry_run_with(root, f"lora: {{final: {json.dumps(final)}}}\n", ["results/phase11/final.pt"],
                         ("--forcerun", "export_final"))
        job = next(j for j in r.jobs if j["rule"] == "export_final")
        assert source in job["input"], job
    (root / "bad.yaml").write_text("lora: {final: nosuch}\n")
    try:
        r = snakemake(root, ["results/phase11/final.pt"], ("fast.yaml", "bad.yaml"), ("-n",))
    finally:
        (root / "bad.yaml").unlink()
    assert r.rc != 0 and "nosuch" in r.out


# ---- the report (issue 11.4) ----------------------------------------------------------------
@pytest.mark.slow
def test_the_main_command_builds_the_report_items(tmp_path):
    """`snakemake --report` needs every item marked report() to exist; after the README's main
    command (target final.pt) they did not (`evaluation.html marked for report but does not
    exist`): they came from rule all only. Now final.pt's DAG has the report job, every item
    among its outputs. (test_snakemake_report_opens_in_a_browser runs --report on a built tree.)"""
    root = make_tree(tmp_path / "tree")
    r = dry_run(root, ["results/phase11/final.pt"])
    jobs = [j for j in r.jobs if j["rule"] == "report_items"]
    assert len(jobs) == 1, r.rules()
    outputs = set(jobs[0]["output"].split(", "))
    import yaml
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    clips = merged_config(root)["eval"].get("report_clips",
                                            schema["properties"]["eval"]["properties"]["report_clips"]["default"])
    items = {"results/report/evaluation.html"} | {f"results/report/clip-{k:02d}.html" for k in range(clips)}
    items |= {f"results/report/curves-{p.replace('/', '-')}.png" for p in PHASE_DIRS}
    assert outputs == items, outputs ^ items


def test_snakemake_report_opens_in_a_browser(built, tmp_path):
    """`snakemake --report` gives one self-contained page; in a real headless Chromium, after the
    report's JavaScript has rendered: the evaluation table, every phase's curves, and listening
    pages with one decoded spectrogram and one playable audio player per model and the target."""
    from browser import CHROMIUM, PAGE_CONTENT, Chromium, show_result
    if CHROMIUM is None:
        pytest.skip("needs chromium (apt-get install chromium)")
    root, _ = built
    html = tmp_path / "report.html"
    r = snakemake(root, extra=("--report", str(html)))
    assert r.rc == 0 and html.is_file(), r.out[-3000:]
    models = json.loads((root / "results/phase11/eval.json").read_text())["models"]
    with Chromium(tmp_path / "profile") as b:
        b.open(html.as_uri())
        b.wait_for("!!document.querySelector('#app a')")
        show_result(b, "1. Evaluation")
        page = b.eval(PAGE_CONTENT, b.frame_context("filename=evaluation.html"))
        assert page["tables"] == ["means", "vs-baseline"] and page["rows"] == list(models)
        b.screenshot(tmp_path / "evaluation.png")
        show_result(b, "3. Listening")
        page = b.eval(PAGE_CONTENT, b.frame_context("filename=clip-00.html"))
        assert page["images"] == page["decoded"] == page["audio"] == len(models) + 1, page
        assert page["errors"] == 0 and all(s > 0.5 for s in page["seconds"]), page
        shot = b.screenshot(tmp_path / "clip.png")
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
        show_result(b, "2. Training curves", len(PHASE_DIRS) - 1)
        assert b.wait_for("(() => { const i = document.querySelector('#app img[src^=\"data:image/png\"]');"
                          " return i && i.complete && i.naturalWidth; })()") > 300
        b.screenshot(tmp_path / "curves.png")
