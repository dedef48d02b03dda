"""The library call and streaming (issue 20): `pipeline.load` gives a Decoder whose `decode` takes
SNAC's layout and refuses bad codes with the `decode` command's own messages; its streams return,
for any chunking of the codes, pieces that concatenate to the whole decode (noise off), lagging
the codes by the measured right context and holding a bounded window of codes; for the 24 kHz
family and an attention family (32 kHz: quantum 32 frames). Orpheus' flat token list decodes to
what the same codes as .npz decode to."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ROOT, TINY_24K
from test_infer import FAMILIES, model_for

import pipeline
from pipeline.__main__ import main
from pipeline.evaluation.codes import orpheus_codes
from pipeline.evaluation.decoder import Decoder
from pipeline.evaluation.stream import Stream, StreamClosed
from pipeline.model.codecs import snac as M
from pipeline.model.codecs.snac import geometry
from pipeline.model import codecs

STREAM_TOL = 1e-4       # the bound; measured: under 4e-7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine OpenMP's barrier
    waits make many small decodes take seconds each instead of milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def decoders():
    return {f: Decoder(model_for(FAMILIES[f])) for f in ("24khz", "32khz")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved 24 kHz-family model with SNAC's noise blocks (as trained models have them)."""
    d = tmp_path_factory.mktemp("model")
    codecs.save_model(model_for(TINY_24K), d)
    return d


def random_codes(g, frames, batch, seed):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, g.codebook_size, (batch, frames // s))) for s in g.strides]


def cut(codes, g, a, b):
    return [c[:, a // s:b // s] for c, s in zip(codes, g.strides)]


# ---- the library call --------------------------------------------------------------------------
def test_import_pipeline_stays_light():
    """The Snakefile imports pipeline.settings at parse time: the package itself must not pull in
    torch; `load` does."""
    code = "import sys, pipeline, pipeline.settings; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_load_gives_the_model_in_eval_mode_with_noise_as_trained(model_dir):
    dec = pipeline.load(model_dir, device="cpu")
    g = dec.geometry
    assert not dec.model.training and dec.device.type == "cpu"
    assert (g.codec_rate, g.target_rate, g.strides, g.quantum, g.codebook_size, g.n_codebooks) == \
        (24000, 48000, (4, 2, 1), 4, 64, 3)
    codes = random_codes(g, 4 * g.quantum, 2, 0)
    a, b = dec.decode(codes), dec.decode(codes)
    assert a.shape == (2, 1, 4 * g.quantum * g.hop_target) and a.dtype == torch.float32
    assert not torch.equal(a, b)                   # SNAC's noise blocks, random as trained
    with dec.model.noise_disabled():
        ref = dec.model.decode(codes)
        assert torch.equal(dec.decode(codes), ref)
        assert torch.equal(dec.decode([c.numpy().astype(np.int32) for c in codes]), ref)   # arrays, any int type
        assert torch.equal(dec.decode([c[0] for c in codes]), dec.model.decode([c[:1] for c in codes]))  # 1-D: a clip


def test_loading_a_decoder_never_runs_the_encoder(model_dir, monkeypatch):
    """pipeline.load measures the decoder's reach (its stream needs it), not the encoder's: two
    encoder passes per load were spent on nothing. Each side is measured once, when asked."""
    from pipeline.model.codecs import snac
    ran = []
    for name, side in (("reach", "encoder"), ("decode_reach", "decoder")):
        monkeypatch.setattr(snac, name, lambda *a, f=getattr(snac, name), side=side, **k: ran.append(side) or f(*a, **k))
    dec = pipeline.load(model_dir, device="cpu")
    assert ran == ["decoder"] and dec.model.context("decoder") == dec.context and ran == ["decoder"]
    left, right = dec.model.context("encoder")
    assert dec.model.context("encoder") == (left, right) and ran == ["decoder", "encoder"] and left == right > 0
    with pytest.raises(ValueError, match="side must be"):
        dec.model.context("both")


def test_load_applies_a_lora_file(model_dir, tmp_path):
    from pipeline.model.lora import LoRAConfig, apply_lora, save_lora
    m = codecs.load_model(model_dir)
    cfg = LoRAConfig(rank=2, alpha=4.0, targets=["decoder.model.*"])
    apply_lora(m, cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_lora(m, tmp_path / "a.safetensors", cfg, base_digest=codecs.load_model(model_dir).base_digest())
    plain, adapted = pipeline.load(model_dir, device="cpu"), pipeline.load(model_dir, lora=tmp_path / "a.safetensors")
    codes = random_codes(plain.geometry, 8, 1, 0)
    with plain.model.noise_disabled(), adapted.model.noise_disabled(), m.noise_disabled():
        assert torch.allclose(adapted.decode(codes), m.decode(codes), atol=1e-6)
        assert not torch.allclose(plain.decode(codes), adapted.decode(codes), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.load(tmp_path / "nothing")


def _bad_codes(g):
    T = 4 * g.quantum
    ok = [np.arange(T // s) % g.codebook_size for s in g.strides]
    return [ok[:2], [ok[0], ok[1], ok[2] + g.codebook_size], [ok[0] - 1, ok[1], ok[2]],
            [ok[0], ok[1], ok[2][:-1]], [c[None, None] for c in ok], [ok[0][None], ok[1], ok[2]],
            [c > 3 for c in ok], [c + 0.5 for c in ok], [ok[0], ok[1], np.where(ok[2] == 5, np.nan, ok[2])],
            [np.zeros(0, np.int64)] * 3, [c[:len(c) // 2] for c in ok[:1]] + ok[1:]]


def test_bad_codes_get_the_decode_commands_messages(model_dir, tmp_path, capsys):
    """Every refusal the `decode` command makes of an .npz, the library makes of the same arrays
    in memory (as numpy arrays and as tensors), in the same words after the name of the array."""
    dec = pipeline.load(model_dir, device="cpu")
    path = tmp_path / "c.npz"
    for arrays in _bad_codes(dec.geometry):
        np.savez(path, *arrays)
        assert main(["decode", "--model", str(model_dir), str(path), str(tmp_path / "o.wav")]) == 1
        out = capsys.readouterr().out.strip()
        assert out.startswith("error: ") and len(out.splitlines()) == 1, out
        cli = out.removeprefix(f"error: {path}: ")
        for given in (arrays, [torch.from_numpy(np.asarray(a)) for a in arrays]):
            with pytest.raises(ValueError) as e:
                dec.decode(given)
            lib = str(e.value)
            assert "\n" not in lib
            names = [f"arr_{i}" for i in range(len(arrays))]
            for i, n in enumerate(names):          # the arrays' names: npz keys vs codes[i]
                lib = lib.replace(f"codes[{i}]", n)
            lib = lib.removeprefix("codes: ").replace("a list of (batch, codes) integer tensors, one per codebook,"
                                                      " coarsest first", "numpy.savez of one int array per codebook,"
                                                      " coarsest first")
            assert lib == cli, (lib, cli)
    with pytest.raises(ValueError, match="expected a list"):
        dec.decode(torch.zeros(3, 8, dtype=torch.long))


# ---- streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["24khz", "32khz"])
def test_stream_equals_the_whole_decode_for_any_chunking(decoders, family):
    """Random chunkings (seeded): the pieces concatenate to decode() of all the codes; after each
    push exactly the audio up to right context before the codes' end has come out (no later); the
    codes held stay within left + right + one push."""
    dec = decoders[family]
    g, q = dec.geometry, dec.geometry.quantum
    left, right = dec.context
    assert left > 0 and right > 0 and left % q == 0 and right % q == 0
    n_quanta, trials, batch = (16, 3, 2) if family == "24khz" else (8, 2, 2)
    frames = n_quanta * q
    codes = random_codes(g, frames, batch, 1)
    rng = np.random.default_rng(2)
    with dec.model.noise_disabled():
        ref = dec.decode(codes)
        for trial in range(trials):
            cuts = sorted(rng.choice(np.arange(1, n_quanta), size=int(rng.integers(1, n_quanta)), replace=False))
            edges = [0, *(int(c) * q for c in cuts), frames]
            s, pieces, out = dec.stream(batch=batch), [], 0
            for a, b in zip(edges[:-1], edges[1:]):
                pieces.append(s.push(cut(codes, g, a, b)))
                out += pieces[-1].shape[-1]
                assert out == max(0, b - right) * g.hop_target, (trial, a, b)    # lag: exactly `right`
                assert s.held_frames <= left + right + (b - a)
            pieces.append(s.flush())
            y = torch.cat(pieces, dim=-1)
            assert y.shape == ref.shape and (y - ref).abs().max() < STREAM_TOL, trial
            assert sum(p.shape[-1] for p in pieces[:-1]) > 0          # audio before the flush
        if family != "24khz":
            return
        # a quantum less context on either side shows: the measured context is what the decoder needs
        one, ref = [c[:1] for c in codes], ref[:1]
        for ctx in ((left - q, right), (left, right - q), (0, 0)):
            s = Stream(dec.model, ctx)
            y = torch.cat([s.push(cut(one, g, a, a + q)) for a in range(0, frames, q)] + [s.flush()], dim=-1)
            assert (y - ref).abs().max() > 1e-5, ctx


def test_independent_streams_and_a_long_one_hold_bounded_codes(decoders):
    """Two streams fed alternately (two TTS requests at their own pace) each give their own
    decode; one stream of many pushes never holds more than left + right + one push of codes."""
    dec = decoders["24khz"]
    g, q = dec.geometry, dec.geometry.quantum
    left, right = dec.context
    frames = 30 * q
    a_codes, b_codes = random_codes(g, frames, 1, 3), random_codes(g, frames // 2, 1, 4)
    with dec.model.noise_disabled():
        sa, sb, ya, yb = dec.stream(), dec.stream(), [], []
        for k in range(0, frames, q):
            ya.append(sa.push(cut(a_codes, g, k, k + q)))
            assert sa.held_frames <= left + right + q
            if k < frames // 2 and k % (2 * q) == 0:
                yb.append(sb.push(cut(b_codes, g, k, k + 2 * q)))
        ya.append(sa.flush())
        yb.append(sb.flush())
        for y, codes in ((ya, a_codes), (yb, b_codes)):
            assert (torch.cat(y, -1) - dec.decode(codes)).abs().max() < STREAM_TOL
    with pytest.raises(StreamClosed):
        sa.push(cut(a_codes, g, 0, q))


def test_stream_refuses_what_is_not_whole_quanta_of_its_batch(decoders):
    dec = decoders["32khz"]
    g = dec.geometry
    s = dec.stream(batch=2)
    with pytest.raises(ValueError, match=f"not a multiple of {g.quantum}.*windows of 32 frames"):
        s.push(random_codes(g, g.quantum // 2, 2, 0))
    with pytest.raises(ValueError, match=r"batch of 1 rows, the stream was opened for 2"):
        s.push(random_codes(g, g.quantum, 1, 0))
    with pytest.raises(ValueError, match="outside"):
        s.push([c + g.codebook_size for c in random_codes(g, g.quantum, 2, 0)])
    assert s.push(random_codes(g, g.quantum, 2, 0)).shape == (2, 1, 0)   # still usable, nothing final yet
    with pytest.raises(ValueError, match="batch must be"):
        dec.stream(batch=0)


# ---- Orpheus' flat token list ------------------------------------------------------------------
def orpheus_tokens(c0, c1, c2, offset=0):
    """The layout as Orpheus writes it (canopylabs' decoder), spelled out independently of
    codes.orpheus_order: per frame t, c0[t], c1[2t], c2[4t], c2[4t+1], c1[2t+1], c2[4t+2], c2[4t+3],
    the token at position p plus p * offset."""
    out = []
    for t in range(len(c0)):
        frame = [c0[t], c1[2 * t], c2[4 * t], c2[4 * t + 1], c1[2 * t + 1], c2[4 * t + 2], c2[4 * t + 3]]
        out += [int(v) + p * offset for p, v in enumerate(frame)]
    return out


def test_orpheus_token_lists_decode_like_the_npz(tmp_path):
    """Raw codes as JSON, position-offset codes as text, and Orpheus' <custom_token_N> output
    (control tokens and all) give the file the .npz of the same codes gives."""
    d = tmp_path / "m"
    codecs.save_model(model_for(dict(TINY_24K, noise=False)), d)
    g = geometry(TINY_24K, 48000)
    rng = np.random.default_rng(5)
    codes = [rng.integers(0, g.codebook_size, 12 // s) for s in g.strides]
    np.savez(tmp_path / "c.npz", *codes)
    size = g.codebook_size
    (tmp_path / "raw.json").write_text(json.dumps(orpheus_tokens(*codes)))
    (tmp_path / "offset.txt").write_text(", ".join(map(str, orpheus_tokens(*codes, offset=size))) + "\n")
    custom = "".join(f"<custom_token_{v + 10}>" for v in orpheus_tokens(*codes, offset=size))
    (tmp_path / "custom.txt").write_text(f"<custom_token_1>{custom}<custom_token_2>\n")
    assert main(["decode", "--model", str(d), str(tmp_path / "c.npz"), str(tmp_path / "ref.wav")]) == 0
    ref, rate = sf.read(tmp_path / "ref.wav")
    assert rate == 48000 and len(ref) == 12 * g.hop_target
    for name in ("raw.json", "offset.txt", "custom.txt"):
        assert main(["decode", "--model", str(d), str(tmp_path / name), str(tmp_path / "o.wav")]) == 0
        assert np.array_equal(sf.read(tmp_path / "o.wav")[0], ref), name


def test_orpheus_token_lists_that_do_not_fit_are_refused(tmp_path, capsys):
    g = geometry(TINY_24K, 48000)
    size = g.codebook_size
    tokens = orpheus_tokens(*[np.arange(8 // s) for s in g.strides], offset=size)
    assert [c.tolist() for c in orpheus_codes(tokens, g)] == [[[0, 1]], [[0, 1, 2, 3]], [list(range(8))]]
    with pytest.raises(ValueError, match="13 tokens is not a whole"):
        orpheus_codes(tokens[:13], g)
    mixed = list(tokens)
    mixed[3] -= size                         # one raw code among offset ones
    with pytest.raises(ValueError, match=rf"token 3 \(frame 0, position 3\) is {mixed[3]}: .*position 3 holds "
                                         rf"\[{3 * size}, {4 * size}\)"):
        orpheus_codes(mixed, g)
    raw = orpheus_tokens(*[np.arange(8 // s) for s in g.strides])
    with pytest.raises(ValueError, match=r"codebook 0 has codes outside \[0, 64\): min -1"):
        orpheus_codes([-1] + raw[1:], g)
    g44 = geometry(FAMILIES["44khz"], 88200)
    with pytest.raises(ValueError, match=r"defined for 3 codebooks with strides 4/2/1.*\[8, 4, 2, 1\].*\.npz"):
        orpheus_codes(tokens, g44)
    for name, text, msg in (("a.json", '{"codes": [1]}', "expected a JSON array of integers"),
                            ("b.txt", "1 2 x3", "'x3' is not an integer"),
                            ("c.txt", "<custom_token_11> hello <custom_token_12>", "'hello' between")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            from pipeline.evaluation.codes import read_codes
            read_codes(tmp_path / name, g)


def test_bench_decode_measures_both_paths_on_a_saved_model(model_dir):
    """`python -m pipeline bench decode --model` runs end to end (figures, no timing asserted): an
    offline figure per round and a latency per push that returned audio, for the 48 kHz decoder and
    SNAC's own, with the stream's lag."""
    from pipeline import bench
    r = bench.decode(str(model_dir), seconds=1.0, rounds=2, pushes=3, devices=["cpu"])
    assert set(r) == {"cpu/48 kHz decoder", "cpu/SNAC 24 kHz"}
    for v in r.values():
        assert len(v["x_real_time"]) == 2 and len(v["push_ms"]) == 6 and v["lag_ms"] == pytest.approx(12 * 512 / 24)
