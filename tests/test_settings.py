"""pipeline.settings: the phase chain and every default come from the schema, job settings are
built once (complete and checked, mistakes named by their config key), and the trainer takes them
as they are."""
from __future__ import annotations

import inspect

import pytest
import yaml
from conftest import ROOT

from pipeline import settings as S


def demo_config() -> dict:
    return S.with_defaults(yaml.safe_load((ROOT / "config/config.yaml").read_text()))


def test_phase_chain_is_the_schemas():
    phases = S.schema()["properties"]["train"]["properties"]
    assert S.PHASES == tuple(k for k, v in phases.items() if "x-after" in v)
    for p in S.PHASE_CHAIN.values():
        assert p.after == phases[p.name]["x-after"] and p.adapters == phases[p.name].get("x-adapters")
        assert p.after is None or S.PHASES.index(p.after) < S.PHASES.index(p.name)
    # the workflow's jobs: one per phase, one per adapter of a phase with adapters, in chain order
    cfg = demo_config()
    adapters = list(cfg["lora"]["adapters"])
    jobs = S.training_jobs(cfg)
    assert [j.phase for j in jobs] == [p for p in S.PHASES for _ in (adapters if S.PHASE_CHAIN[p].adapters else [0])]
    assert [j.adapter for j in jobs if j.adapter] == adapters
    assert S.final_job(cfg) == S.Job(S.ADAPTER_PHASES[0], cfg["lora"]["final"])
    # final: null -> final.pt is the phase before the adapters'
    cfg["lora"]["final"] = None
    assert S.final_job(cfg) == S.Job(S.PHASE_CHAIN[S.ADAPTER_PHASES[0]].after)


def test_adapters_default_only_when_none_is_named():
    """The schema's default adapter map applies to a config without one; it is not merged into a
    config's own (with_defaults would otherwise add an adapter nobody asked for)."""
    phase = S.ADAPTER_PHASES[0]
    assert [j.adapter for j in S.training_jobs({}) if j.adapter] == ["default"]
    cfg = S.with_defaults({"lora": {"adapters": {"speakerA": {"dataset_ids": [3]}}}})
    assert [j.adapter for j in S.training_jobs(cfg) if j.adapter] == ["speakerA"]
    assert S.phase_settings(cfg, phase, "speakerA")["dataset_ids"] == [3]
    with pytest.raises(ValueError, match="lora.final names 'nobody'"):
        S.training_jobs({"lora": {"adapters": {"a": {}}, "final": "nobody"}})


def test_a_mistake_names_its_config_key():
    phase = S.ADAPTER_PHASES[0]
    with pytest.raises(ValueError, match=r"^lora\.adapters\.x\.lr: "):
        S.phase_settings({"lora": {"adapters": {"x": {"lr": -1.0}}}}, phase, "x")
    with pytest.raises(ValueError, match=rf"^train\.{S.PHASES[0]}: warmup_steps 5 > steps 2"):
        S.phase_settings({"train": {S.PHASES[0]: {"steps": 2, "warmup_steps": 5}}}, S.PHASES[0])
    with pytest.raises(ValueError, match=r"^lora\.adapters\.y: no such adapter"):
        S.phase_settings({}, phase, "y")


def test_library_defaults_are_the_schemas():
    """What library callers get without a config is the schema's default (the LoRA targets were
    ["*"] in code and ["decoder.*"] in the schema)."""
    from pipeline.data.demo import generate_demo
    from pipeline.training.democodec import DEFAULTS
    from pipeline.model.lora import LoRAConfig
    from pipeline.training.losses import MultiResolutionSTFTLoss, ReconstructionLoss
    lora = S.TRAIN_DEFAULTS["lora"]
    assert vars(LoRAConfig()) == {k: v for k, v in lora.items() if k != "enabled"}
    assert list(MultiResolutionSTFTLoss().n_ffts) == S.TRAIN_DEFAULTS["n_ffts"]
    loss = ReconstructionLoss(48000, {"stft": 1.0, "mel": 1.0})
    assert list(loss.stft.n_ffts) == S.TRAIN_DEFAULTS["n_ffts"]
    assert loss.mel.mel.n_mels == S.TRAIN_DEFAULTS["n_mels"]
    demo = {k: p.default for k, p in inspect.signature(generate_demo).parameters.items() if k in S.DEMO_DEFAULTS}
    assert demo == S.DEMO_DEFAULTS
    assert {k: DEFAULTS[k] for k in S.DEMO_CODEC_DEFAULTS} == S.DEMO_CODEC_DEFAULTS
    # the embedded demo config spells out the same values: its params are what they were
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert cfg["demo"] == S.DEMO_DEFAULTS and S.merge(S.DEMO_CODEC_DEFAULTS, cfg["codec"]["demo"]) == cfg["codec"]["demo"]


def test_trainer_takes_settings_as_they_are(tmp_path):
    """No second completion in the trainer: settings that did not come through phase_settings (or
    settings.complete) are refused before any work, naming what is missing."""
    from conftest import settings
    from pipeline.training.train import train
    s = settings()
    del s["source_weights"], s["n_mels"]
    with pytest.raises(ValueError, match=r"train\.warmup: settings without n_mels, source_weights"):
        train("warmup", s, tmp_path / "codec", [], [], None, tmp_path / "out", target_rate=48000)
    assert not (tmp_path / "out").exists()
