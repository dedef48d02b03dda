"""Faults and hostile input: one test per row of issue 8's fault table, each reproducing the fault
and asserting what the user sees (the message, the exit status, what is rebuilt).

Rows are added by whoever fixes them; the workflow-level ones share the demo built once per
session (`built_demo` in workflow_util.py) and change only copies of it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from workflow_util import (N_SHARDS, built_demo, clone_tree, dry_run, lora_adapters, make_tree,
                           merged_config, parse_jobs, run_env, snakemake, REPO)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return built_demo(tmp_path_factory)


ADAPTERS, _ = lora_adapters(merged_config(REPO))
TRAINING = ({("train", "phase=warmup"), ("train", "phase=full"), ("evaluate", ""), ("export_final", ""),
             ("all", "")} | {("train_lora", f"adapter={a}") for a in ADAPTERS})


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
                     "export_final"}, rules
    assert len(shells) == len(jobs)
    quoted = f"'{spaced_python}' -m pipeline "
    assert all(quoted in s for s in shells), [s for s in shells if quoted not in s][:2]
