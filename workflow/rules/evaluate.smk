# Held-out metrics for the 24 kHz baseline (upsampled with soxr) and each 48 kHz stage.


rule evaluate:
    input:
        codec=codec_files(),
        heldout=shard_paths("heldout"),
        warmup=f"{PHASE_DIR}/warmup/model.safetensors",
        full=f"{PHASE_DIR}/full/model.safetensors",
        final=f"{PHASE_DIR}/final.pt",
    output:
        f"{PHASE_DIR}/eval.json",
    params:
        settings=json.dumps(config.get("eval", {}), sort_keys=True),
        codec=codec_dir(),
    threads: 2
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {PY} evaluate --codec {params.codec:q} --heldout {input.heldout:q}"
        " --model warmup={PHASE_DIR}/warmup --model full={PHASE_DIR}/full --model final={input.final:q}"
        " --out {output:q} --settings {params.settings:q} 2>&1 | tee {log}"
