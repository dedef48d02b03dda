# Held-out metrics for the 24 kHz baseline (upsampled with soxr) and each 48 kHz stage. It runs
# before the export, so asking for final.pt also produces the evaluation table.


rule evaluate:
    input:
        codec=codec_files(),
        heldout=shard_paths("heldout"),
        models=[f"{d}/model.safetensors" for d in eval_models().values()],
    output:
        f"{PHASE_DIR}/eval.json",
    params:
        settings=json.dumps(config.get("eval", {}), sort_keys=True),
        codec=codec_dir(),
        models=" ".join(f"--model {n}={d}" for n, d in eval_models().items()),
    threads: 2
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {PY} evaluate --codec {params.codec:q} --heldout {input.heldout:q}"
        " {params.models} --out {output:q} --settings {params.settings:q} 2>&1 | tee {log}"
