"""Mimi through the whole pipeline on the tiny random Mimi (conftest.mimi_dir, n_q = 4 of its 6
codebooks): precompute, `cache-info --check --codec`, the library's load + stream (on a smart-init
Mimi48), and, slow (several phases), the three phases at trainer level, final.pt, resynth, decode."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import settings, speechlike

import pipeline
from pipeline.__main__ import main
from pipeline.model import codecs
from pipeline.training import train as T

N_Q = 4
DECODER = [{"pattern": p, "trainable": True, "lr_factor": 1.0} for p in ("upsample", "decoder_transformer", "decoder")]
LORA = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0,
        "targets": ["upsample.*", "decoder_transformer.*", "decoder.*"]}


@pytest.fixture(scope="module")
def cached(mimi_dir, tmp_path_factory):
    """A cache of the demo corpus encoded by the tiny Mimi (n_q 4): its folder."""
    from pipeline.data.demo import generate_demo
    from pipeline.data.precompute import run_shard
    d = tmp_path_factory.mktemp("mimi-run")
    generate_demo(d / "demo", seed=5, n_train=4, n_heldout=2, min_seconds=1.2, max_seconds=2.0)
    codec = codecs.load(mimi_dir, N_Q)
    for name, m in (("cache", "manifest.jsonl"), ("heldout", "heldout.jsonl")):
        run_shard(d / "demo" / m, 0, 1, codec, d / name / "shard-000.zarr", {"n_q": N_Q})
    return d


@pytest.fixture(scope="module")
def trained(cached, mimi_dir):
    """The three phases trained on the cache for a few steps each, then exported: (folder, phase
    outputs' state dicts). Several phases: the tests that use it are slow."""
    d = cached
    shards, held = [str(d / "cache/shard-000.zarr")], [str(d / "heldout/shard-000.zarr")]
    s = dict(steps=2, val_every=2, ckpt_every=2, log_every=1, segment_seconds=0.4, n_ffts=[256, 512])
    for phase, init, over in (("warmup", None, {}), ("full", "warmup", {"groups": DECODER}),
                              ("lora", "full", {"lora": LORA, "groups": [{"pattern": "*.lora_*"}], "lr": 1e-2})):
        T.train(phase, settings(**s, **over), mimi_dir, shards, held, init and d / init, d / phase, target_rate=48000)
    codecs.export_final(d / "lora", d / "final.pt")
    return d, {p: codecs.load_model(d / p).state_dict() for p in ("warmup", "full", "lora")}


@pytest.fixture(scope="module")
def smart_mimi48(mimi_dir, tmp_path_factory):
    """A Mimi48 as smart init makes it, saved as a model folder (what pipeline.load reads)."""
    return codecs.save_model(codecs.from_codec(codecs.load(mimi_dir, N_Q), 48000), tmp_path_factory.mktemp("m48"))


def test_the_cache_records_n_q_and_passes_its_alignment_checks(cached, mimi_dir, capsys):
    d = cached
    assert main(["cache-info", str(d / "cache"), "--check", "--codec", str(mimi_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    fp, r = info["fingerprint"], info["shards"][0]["alignment"]
    assert (fp["family"], fp["n_q"], fp["strides"], fp["hop"], fp["hop_target"]) == ("mimi", N_Q, [1] * N_Q, 1920, 3840)
    assert r["checks"] > 0 and r["slicing_ok"] and r["reencode_match"] >= 0.9 and r["decode_max_err"] < 1e-4
    assert r["encoder_context"][0] >= 125 and r["decoder_context"] == [r["decoder_context"][0], 0]   # causal
    assert not info["problems"]
    # another n_q is another cache: training refuses it
    other = codecs.load(mimi_dir, N_Q - 1).fingerprint(48000, fp["cache_format"])
    from pipeline.data.cache import CacheError, open_cache
    with pytest.raises(CacheError, match="n_q"):
        open_cache(d / "cache", expect=other)


@pytest.mark.slow
def test_three_phases_train_what_their_groups_name_and_export(trained, mimi_dir):
    d, sd = trained
    codec = codecs.load(mimi_dir, N_Q).state_dict()
    frozen = ("encoder.", "encoder_transformer.", "downsample.", "quantizer.")
    for phase_sd in sd.values():            # Mimi's encoder side is bit-identical in every phase output
        assert all(torch.equal(phase_sd[k], codec[k]) for k in codec if k.startswith(frozen))
    start = codecs.from_codec(codecs.load(mimi_dir, N_Q), 48000).state_dict()
    moved = lambda a, b, prefix: any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))
    assert moved(sd["warmup"], start, "decoder.new_block.") and not moved(sd["warmup"], start, "decoder_transformer.")
    assert moved(sd["full"], sd["warmup"], "decoder_transformer.") and moved(sd["full"], sd["warmup"], "upsample.")
    assert sd["lora"].keys() == sd["full"].keys() and moved(sd["lora"], sd["full"], "decoder")   # merged
    cfg = json.loads((d / "full/config.json").read_text())
    assert cfg["format"] == "phase11-mimi48/1" and cfg["n_q"] == N_Q
    assert {g["pattern"] for g in cfg["settings"]["groups"]} == {"upsample", "decoder_transformer", "decoder"}
    final = torch.load(d / "final.pt", weights_only=True)
    assert all(torch.equal(final["state_dict"][k], v) for k, v in sd["lora"].items())


@pytest.mark.slow
def test_resynth_and_decode(trained, tmp_path):
    d, _ = trained
    sf.write(tmp_path / "in.wav", speechlike(1.5, 44100, 4), 44100)
    assert main(["resynth", "--model", str(d / "final.pt"), str(tmp_path / "in.wav"), str(tmp_path / "out.wav"),
                 "--device", "cpu"]) == 0
    y, sr = sf.read(tmp_path / "out.wav")
    assert sr == 48000 and len(y) == 72000 and np.abs(y).max() > 0           # 1.5 s in, 1.5 s out
    codes = np.random.default_rng(1).integers(0, 64, (N_Q, 2, 6))               # n_q arrays at stride 1, a batch of 2
    np.savez(tmp_path / "codes.npz", *codes)
    assert main(["decode", "--model", str(d / "final.pt"), str(tmp_path / "codes.npz"), str(tmp_path / "o.wav"),
                 "--device", "cpu"]) == 0
    assert [sf.info(tmp_path / f"o-{k}.wav").frames for k in (0, 1)] == [6 * 3840] * 2
    dec = pipeline.load(d / "final.pt", device="cpu")          # the library reads the same final.pt
    y = dec.decode([torch.from_numpy(c) for c in codes])
    assert y.shape == (2, 1, 6 * 3840)
    np.testing.assert_allclose(sf.read(tmp_path / "o-1.wav")[0], y[1, 0].clamp(-1, 1).numpy(), atol=1e-4)
    np.savez(tmp_path / "three.npz", *codes[:3])
    (tmp_path / "t.json").write_text(json.dumps(list(range(14))))
    for name, msg in (("three.npz", "3 arrays"), ("t.json", "Orpheus' 7-token layout is defined for 3 codebooks")):
        with pytest.raises(ValueError, match=msg):
            from pipeline.evaluation import infer
            infer.decode(d / "final.pt", tmp_path / name, tmp_path / "x.wav", "cpu")


@pytest.mark.parametrize("push", [23, 37])
def test_load_and_stream_equal_the_whole_decode_with_bounded_codes(smart_mimi48, push):
    """pipeline.load of a Mimi48 folder decodes, and its stream's pieces, for two chunkings, equal
    the whole decode of codes longer than the decoder transformer's window (the stream then drops
    codes: its left context, from the loaded config, must cover all the decoder looks back)."""
    dec = pipeline.load(smart_mimi48, device="cpu")
    g, (left, right) = dec.geometry, dec.context
    assert (g.strides, g.quantum, right) == ((1,) * N_Q, 1, 1)      # the cubic head looks one frame ahead
    assert 125 <= left <= 140                                       # the transformer's window: a bound, not a blow-up
    n = left + right + 40
    codes = [torch.from_numpy(c) for c in np.random.default_rng(3).integers(0, 64, (N_Q, 1, n))]
    whole = dec.decode(codes)
    assert whole.shape == (1, 1, n * g.hop_target)
    s, pieces, held = dec.stream(), [], []
    for t in range(0, n, push):
        pieces.append(s.push([c[:, t:t + push] for c in codes]))
        held.append(s.held_frames)
    assert sum(p.shape[-1] for p in pieces) >= (n - right - push) * g.hop_target      # audio before the flush
    pieces.append(s.flush())
    torch.testing.assert_close(torch.cat(pieces, -1), whole, rtol=0, atol=1e-4)
    assert max(held) <= left + right + push and held[-1] < n          # old codes were dropped
    if push == 37:               # the check sees the transformer: 20 frames less left context is not exact
        from pipeline.evaluation.stream import Stream
        short = Stream(dec.model, (left - 20, right))
        pieces = [short.push([c[:, t:t + push] for c in codes]) for t in range(0, n, push)] + [short.flush()]
        assert (torch.cat(pieces, -1) - whole).abs().max() > 1e-4


def test_the_preset_fits_mimi48s_names_and_trains_its_whole_decoder_path():
    """config/mimi_24khz.yaml over the SNAC recipe: every phase's groups, LoRA targets and loss
    sizes pass the parse-time checks against kyutai/mimi's shapes (meta device, no weights), and
    full trains the whole decoder path, nothing of the encoder side."""
    from conftest import ROOT

    from pipeline.configdiff import load_config
    from pipeline.settings import check_segment, phase_settings, training_jobs, with_defaults
    from pipeline.training.groups import check_phase_groups, param_groups
    cfg = with_defaults(load_config([ROOT / "config" / f for f in ("config.yaml", "snac_24khz.yaml", "mimi_24khz.yaml")]))
    assert cfg["codec"]["pretrained"] == "/models/mimi" and cfg["codec"]["n_q"] is None
    phases = {j.name: phase_settings(cfg, j.phase, j.adapter) for j in training_jobs(cfg)}
    shapes = codecs.shapes("mimi")
    check_phase_groups(shapes, 48000, phases)
    geo = codecs.geometry(shapes, 48000)
    for name, s in phases.items():
        check_segment(s, geo, name)
    with torch.device("meta"):
        model = codecs.model_from_config(shapes, 48000)
    groups, _ = param_groups(model, phases["full"]["groups"], 1.0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(("upsample.", "decoder_transformer.", "decoder."))}


def test_a_snac_codec_given_a_mimi_cache_fails_the_preflight(cached, tiny_codec_dir, tmp_path):
    """The cache's n_q reaches the codec's loader before the cache is compared with the codec: a
    SNAC codec refuses it, as the preflight's cache item, naming the codec folder."""
    d = cached
    from pipeline.training.preflight import PreflightFailed
    with pytest.raises(PreflightFailed, match="cannot read this cache's codes: n_q 4"):
        T.train("warmup", settings(steps=2), tiny_codec_dir, [str(d / "cache/shard-000.zarr")],
                [str(d / "heldout/shard-000.zarr")], None, tmp_path / "out", target_rate=48000)
    item = {i["item"]: i for i in json.loads((tmp_path / "out/preflight.json").read_text())["items"]}
    bad = item["cache = codec's, at codec.target_rate"]
    assert not bad["ok"] and str(tiny_codec_dir) in bad["detail"] and "n_q 4" in bad["detail"], bad
