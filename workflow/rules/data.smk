# The demo corpus and the demo codec. A checkpoint, because the shard jobs' inputs are read
# from the manifest it writes.


# LINT (common.smk): no conda env or container, {PY} and {DEMO_DIR} in the shell text
checkpoint demo_data:
    output:
        manifest=f"{DEMO_DIR}/manifest.jsonl",
        heldout=f"{DEMO_DIR}/heldout.jsonl",
    params:
        settings=lambda wc: json.dumps(demo_corpus_settings(), sort_keys=True),
    log:
        f"{LOGS}/demo_data.log",
    benchmark:
        f"{BENCH}/demo_data.tsv"
    shell:
        "{PY} demo-data --out {DEMO_DIR} --settings {params.settings:q} 2>&1 | tee {log}"


# LINT (common.smk): no conda env or container, {PY} in the shell text, hard-coded param out
rule demo_codec:
    input:
        # ancient: editing one manifest line must rerun its shard only, not retrain the codec
        # (which would rerun every shard); the corpus param below catches a regenerated corpus
        manifest=lambda wc: [ancient(m) for m in manifest_of("train")],
    output:
        config=f"{RESULTS}/codec/demo/config.json",
        weights=f"{RESULTS}/codec/demo/model.safetensors",
        quality=f"{RESULTS}/codec/demo/quality.json",
    params:
        settings=lambda wc: json.dumps(config["codec"].get("demo", {}), sort_keys=True),
        corpus=lambda wc: json.dumps([SPLITS["train"]["manifest"], demo_corpus_settings()], sort_keys=True),
        out=f"{RESULTS}/codec/demo",
    threads: 2
    log:
        f"{LOGS}/demo_codec.log",
    benchmark:
        f"{BENCH}/demo_codec.tsv"
    # No OMP_WAIT_POLICY=PASSIVE here, unlike the other rules: every other job of the demo needs
    # this one's codec, so it always runs alone, where PASSIVE only halves its speed (BENCHMARKS.md)
    shell:
        "OMP_NUM_THREADS={threads} {PY} demo-codec --manifest {input.manifest:q} --out {params.out:q}"
        " --settings {params.settings:q} 2>&1 | tee {log}"
