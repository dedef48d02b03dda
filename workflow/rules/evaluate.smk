# Held-out metrics for the 24 kHz baseline (upsampled with soxr) and each 48 kHz stage: eval.json
# (means, spreads, differences to the baseline), per-utterance figures, and a few clips for the
# report. It runs before the export, so asking for final.pt also produces the evaluation table.


# LINT (common.smk): no conda env or container, {PY} in the shell text, hard-coded param codec
rule evaluate:
    input:
        codec=codec_files(),
        heldout=shard_paths("heldout"),
        # the accounting of every manifest line comes with every run that asks for final.pt
        summaries=[f"{RESULTS}/{SPLITS[k]['summary']}/summary.json" for k in SPLITS],
        models=[f"{d}/model.safetensors" for d in eval_models().values()],
    output:
        evaluation=f"{PHASE_DIR}/eval.json",
        utterances=f"{PHASE_DIR}/eval_utterances.jsonl",
        clips=directory(f"{PHASE_DIR}/eval_clips"),
    params:
        # what changes the figures reruns the evaluation; where it runs (x-runtime: device) does not
        settings=json.dumps(split_runtime("eval", config["eval"])[0], sort_keys=True),
        runtime=lambda wc, resources: json.dumps(split_runtime("eval", config["eval"])[1]),
        codec=codec_dir(),
        target_rate=TARGET_RATE,
        models=" ".join(f"--model {n}={d}" for n, d in eval_models().items()),
    threads: 2
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    shell:
        "OMP_NUM_THREADS={threads} NUMBA_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} evaluate"
        " --codec {params.codec:q} --heldout {input.heldout:q} {params.models}"
        " --out {output.evaluation:q} --settings {params.settings:q} --runtime {params.runtime:q}"
        " --target-rate {params.target_rate} 2>&1 | tee {log}"
