# warmup (new block only) -> full (whole decoder) -> lora/<adapter> (one job per named adapter),
# each from the previous phase's output. A phase's merged settings are its params: changing one
# reruns that phase and, through their inputs, the later ones. Step checkpoints live in
# <phase dir>/checkpoints/, NOT a declared output (Snakemake deletes declared outputs before a
# rerun), so a killed job rerun with --rerun-incomplete resumes from its last step.


def train_inputs(wc):
    d = dict(codec=codec_files(), cache=shard_paths("train"), heldout=shard_paths("heldout"))
    prev = {"warmup": None, "full": "warmup"}.get(getattr(wc, "phase", "lora"), "full")
    if prev:
        d["init"] = f"{PHASE_DIR}/{prev}/model.safetensors"
    return d


TRAIN_SHELL = (
    "OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} train --phase {params.phase} --settings {params.settings:q}"
    " --codec {params.codec:q} --cache {input.cache:q} --heldout {input.heldout:q}"
    " {params.init} --out {params.out:q} 2>&1 | tee {log}"
)


rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{PHASE_DIR}/{{phase}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/config.json",
    wildcard_constraints:
        phase="warmup|full",
    params:
        phase=lambda wc: wc.phase,
        settings=lambda wc: phase_json(wc.phase),
        codec=codec_dir(),
        init=lambda wc: f"--init {PHASE_DIR}/warmup" if wc.phase == "full" else "",
        out=lambda wc: f"{PHASE_DIR}/{wc.phase}",
    threads: 2
    resources:
        gpu=1,
    log:
        f"{LOGS}/train/{{phase}}.log",
    benchmark:
        f"{BENCH}/train/{{phase}}.tsv"
    shell:
        TRAIN_SHELL


use rule train as train_lora with:
    input:
        unpack(train_inputs),
    output:
        model=f"{PHASE_DIR}/lora/{{adapter}}/model.safetensors",
        config=f"{PHASE_DIR}/lora/{{adapter}}/config.json",
        lora=f"{PHASE_DIR}/lora/{{adapter}}/lora_weights.safetensors",
    params:
        phase="lora",
        settings=lambda wc: adapter_json(wc.adapter),
        codec=codec_dir(),
        init=lambda wc: f"--init {PHASE_DIR}/full --adapter {wc.adapter}",
        out=lambda wc: f"{PHASE_DIR}/lora/{wc.adapter}",
    log:
        f"{LOGS}/train/lora-{{adapter}}.log",
    benchmark:
        f"{BENCH}/train/lora-{{adapter}}.tsv"


rule export_final:
    input:
        model=f"{final_source()}/model.safetensors",
        evaluation=f"{PHASE_DIR}/eval.json",
    output:
        final=f"{PHASE_DIR}/final.pt",
        model=f"{PHASE_DIR}/model.safetensors",
        config=f"{PHASE_DIR}/config.json",
    params:
        source=final_source(),
    log:
        f"{LOGS}/export_final.log",
    benchmark:
        f"{BENCH}/export_final.tsv"
    shell:
        "{PY} export --phase-dir {params.source:q} --out {output.final:q} 2>&1 | tee {log}"
