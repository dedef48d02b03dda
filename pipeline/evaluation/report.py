"""What a person looks at and listens to: the files `snakemake --report` embeds, and samples
for TensorBoard.

Snakemake's HTML report shows PNG/SVG/JPEG items as images and HTML items in an iframe; any
other file is only a download. So the listening page is a generated HTML item that carries its
spectrograms (PNG) and its audio (FLAC, which browsers play) as data URIs: the page, and the
report that embeds it, stay one self-contained file.

* `write_report_items` -- ``evaluation.html`` (the table: means with 95 % bootstrap intervals,
  paired differences to the baseline), ``clip-<k>.html`` (one held-out clip: the spectrogram of
  target, baseline and every model side by side, 0 to the target's Nyquist frequency with the
  codec's Nyquist frequency marked, each with an audio player) and ``curves-<phase>.png`` (each
  phase's metrics.jsonl).
Spectrogram pictures come from pipeline/training/figures.py (the trainer's TensorBoard samples
draw the same ones).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..training import figures
from ..training.figures import power_db, spectrograms_png


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def curves_png(records: list, title: str) -> bytes:
    """Training curves from metrics.jsonl records: every train/* and val/* term, and the lr."""
    plt = figures.plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    keys = sorted({k for r in records for k in r if k.startswith(("train/", "val/"))})
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        a.plot(*zip(*pts), marker="o" if k.startswith("val/") else None, ms=3, lw=1.2, label=k)
    if keys and all(r[k] > 0 for r in records for k in keys if k in r):
        a.set_yscale("log")
    a.set_xlabel("step")
    a.set_title(title, fontsize=10)
    if keys:
        a.legend(fontsize=7, ncol=2)
    else:
        a.text(0.5, 0.5, "no metrics logged", ha="center", transform=a.transAxes)
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lr:
        b.plot(*zip(*lr), lw=1.2)
    b.set_xlabel("step")
    b.set_title("learning rate", fontsize=10)
    return figures.image_bytes(fig)


# ---- HTML items ----------------------------------------------------------------------------
STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}
.good{background:#d9f2d9}.bad{background:#f6d5d5}.ci{color:#777;font-size:.85em}
.row{display:flex;flex-wrap:wrap;gap:.5em}figure{margin:0}figcaption{font-weight:600;font-size:.9em}
audio{width:100%;display:block}
</style>"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"{STYLE}</head><body><h2>{html.escape(title)}</h2>{body}</body></html>")


def eval_table_html(result: dict) -> str:
    names = list(result["better"])
    arrow = {m: "↑" if result["better"][m] == "max" else "↓" for m in names}
    head = "<tr><th>model</th>" + "".join(f"<th>{m} {arrow[m]}</th>" for m in names) + "</tr>"
    rows, missing = [], result.get("missing", {})

    def gone(model, m):       # utterances the metric does not apply to (e.g. too short for ViSQOL)
        k = missing.get(model, {}).get(m)
        return f" <span class='ci'>({k} missing)</span>" if k else ""
    for model, d in result["models"].items():
        cells = "".join("<td>–" + gone(model, m) + "</td>" if d[m] is None else
                        f"<td>{d[m]:.3f} <span class='ci'>[{result['spread'][model][m]['ci95'][0]:.2f}, "
                        f"{result['spread'][model][m]['ci95'][1]:.2f}]</span>{gone(model, m)}</td>" for m in names)
        rows.append(f"<tr><td>{html.escape(model)}</td>{cells}</tr>")
    diffs = []
    for model, d in result["vs_baseline"].items():
        cells = []
        for m in names:
            if d[m] is None:
                cells.append("<td>–</td>")
                continue
            lo, hi = d[m]["ci95"]
            better = lo > 0 if result["better"][m] == "max" else hi < 0
            worse = hi < 0 if result["better"][m] == "max" else lo > 0
            cls = " class='good'" if better else " class='bad'" if worse else ""
            cells.append(f"<td{cls}>{d[m]['diff']:+.3f} <span class='ci'>[{lo:+.2f}, {hi:+.2f}]</span></td>")
        diffs.append(f"<tr><td>{html.escape(model)} − baseline</td>{''.join(cells)}</tr>")
    b = result["bands_hz"]
    info = (f"<p>{result['utterances']} held-out utterances, {result['seconds']} s "
            f"(of {result['heldout_utterances']}; budget eval.max_seconds = {result['max_seconds']:g} s), "
            f"at {result['target_rate']} Hz; codec rate {result['codec_rate']} Hz. "
            f"LSD bands: lsd_lo_db {b['lsd_lo_db'][0]:g}–{b['lsd_lo_db'][1]:g} Hz, lsd_hi_db "
            f"{b['lsd_hi_db'][0]:g}–{b['lsd_hi_db'][1]:g} Hz, floor {result['lsd_floor_db']:g} dB relative to the "
            f"target's mean power. {html.escape(result.get('visqol', ''))} "
            f"Brackets: 95 % bootstrap interval over utterances; (n missing): utterances a metric does not apply "
            f"to (e.g. shorter than ViSQOL's patch), left out of its mean. Per-utterance figures: "
            f"{html.escape(result['per_utterance'])}.</p>")
    return _page("Held-out evaluation", info + f"<table id='means'>{head}{''.join(rows)}</table>"
                 "<h3>Paired difference to the baseline (model − baseline, utterance by utterance)</h3>"
                 "<p>Green: the whole interval lies on the better side; red: on the worse side.</p>"
                 f"<table id='vs-baseline'>{head}{''.join(diffs)}</table>")


# Chromium refuses to navigate to a URL longer than 2 MiB (url::kMaxURLChars), and Snakemake's
# report shows an HTML item as an iframe on a base64 data: URL: one item may hold about 1.5 MB.
MAX_ITEM_BYTES = 1_500_000


def clip_page_html(clip_dir, k: int, max_bytes: int = MAX_ITEM_BYTES) -> str:
    """The listening page of held-out clip k: the spectrogram of target, baseline and every model
    side by side, each with an audio player (lossless FLAC). Cropped, if need be, so the page
    fits in one report item (``max_bytes``)."""
    import soundfile as sf
    clip_dir = Path(clip_dir)
    index = json.loads((clip_dir / "index.json").read_text())
    rate, mark = index["rate"], index["codec_nyquist_hz"]
    if k >= len(index["clips"]):
        return _page(f"Held-out clip {k + 1}", f"<p>No clip {k + 1}: the evaluation kept {len(index['clips'])}.</p>")
    clip = index["clips"][k]
    sig = {name: sf.read(clip_dir / f, dtype="float32")[0] for name, f in clip["files"].items()}
    n = len(sig["target"])
    while True:
        page = _clip_page(clip["id"], {name: x[:n] for name, x in sig.items()}, rate, mark, n < len(sig["target"]))
        if len(page) <= max_bytes:
            return page
        if n < rate // 2:
            raise ValueError(f"clip {clip['id']}: even {n / rate:.2f} s do not fit in {max_bytes} bytes")
        n = int(n * max_bytes / len(page) * 0.95)


def _clip_page(utt_id, sig: dict, rate: int, mark: float, cropped: bool) -> str:
    import soundfile as sf
    ref = power_db(sig["target"]).max()
    figs = []
    for name, x in sig.items():
        img = spectrograms_png({name: x}, rate, mark, ref_db=ref, fmt="jpeg")
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
        figs.append(f"<figure><figcaption>{html.escape(name)}</figcaption>"
                    f"<img alt='spectrogram of {html.escape(name)}' src='{_uri(img, 'image/jpeg')}'>"
                    f"<audio controls preload='metadata' src='{_uri(buf.getvalue(), 'audio/flac')}'></audio></figure>")
    seconds = len(sig["target"]) / rate
    note = (f"<p>Spectrograms 0–{rate / 2000:g} kHz on one colour scale (dB below the target's loudest bin); the "
            f"dashed line is the codec's Nyquist frequency ({mark / 1000:g} kHz): below it the baseline is the "
            "codec's own decode, above it only the new decoder adds content."
            + (f" Cropped to {seconds:.2f} s to fit one report item." if cropped else "") + "</p>")
    return _page(f"Held-out clip {utt_id} ({seconds:.2f} s)", note + f"<div class='row'>{''.join(figs)}</div>")


def read_metrics(path) -> list:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report_items(evaluation, phases: dict, out_dir, clips: int) -> list:
    """eval.json (with eval_clips/ beside it) and {phase name: phase folder} -> the report's
    files in out_dir: evaluation.html, clip-<k>.html for k < clips, curves-<name>.png.
    Returns their paths."""
    from .evaluate import outputs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev, _, clip_dir = outputs(evaluation)
    written = [out / "evaluation.html"]
    written[0].write_text(eval_table_html(json.loads(ev.read_text())))
    for k in range(clips):
        written.append(out / f"clip-{k:02d}.html")
        written[-1].write_text(clip_page_html(clip_dir, k))
    for name, folder in phases.items():
        p = out / f"curves-{name}.png"
        p.write_bytes(curves_png(read_metrics(Path(folder) / "metrics.jsonl"), f"{name}: training and validation"))
        written.append(p)
    return written
