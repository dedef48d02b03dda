# What `snakemake --report results/report.html` embeds (report() below): the evaluation table,
# a listening page per held-out clip (spectrograms + audio players) and each phase's training
# curves. Snakemake shows HTML items in an iframe and images inline; audio only plays inside an
# HTML item, so each clip page carries its images and FLACs as data URIs (and stays under the
# 2 MiB Chromium allows an iframe's data: URL). rule export_final takes them as inputs: the
# README's main command (final.pt) builds them, and `snakemake --report` works after it.


# LINT (common.smk): no conda env or container, {PY} in the shell text
rule report_items:
    input:
        evaluation=f"{PHASE_DIR}/eval.json",
        clips=f"{PHASE_DIR}/eval_clips",
        # metrics.jsonl is not a declared output of training; its model file orders the jobs
        models=[f"{d}/model.safetensors" for d in report_phases().values()],
    output:
        table=report(f"{REPORT_DIR}/evaluation.html", caption="../report/evaluation.rst",
                     category="1. Evaluation", labels={"item": "held-out metrics"}),
        curves=[report(f"{REPORT_DIR}/curves-{n}.png", caption="../report/curves.rst",
                       category="2. Training curves", labels={"phase": n}) for n in report_phases()],
        clips=[report(f"{REPORT_DIR}/clip-{k:02d}.html", caption="../report/clips.rst",
                      category="3. Listening", labels={"clip": str(k + 1)}) for k in range(N_CLIPS)],
    params:
        phases=" ".join(f"--phase {n}={d}" for n, d in report_phases().items()),
        out=lambda wc, output: os.path.dirname(output.table),
        clips=N_CLIPS,
    log:
        f"{LOGS}/report_items.log",
    benchmark:
        f"{BENCH}/report_items.tsv"
    shell:
        "{PY} report --eval {input.evaluation:q} {params.phases} --clips {params.clips} --out-dir {params.out:q}"
        " 2>&1 | tee {log}"
