# warmup (new block only) -> full (whole decoder) -> lora (adapters), each from the previous
# phase's output. A phase's merged settings are its params: changing one reruns that phase and,
# through their inputs, the later ones. Step checkpoints live in <phase>/checkpoints/, which is
# NOT a declared output (Snakemake deletes declared outputs before a rerun), so a killed job
# rerun with --rerun-incomplete resumes from its last step.


def previous_phase(phase):
    i = PHASES.index(phase)
    return PHASES[i - 1] if i else None


def train_inputs(wc):
    prev = previous_phase(wc.phase)
    d = dict(codec=codec_files(), cache=shard_paths("train"), heldout=shard_paths("heldout"))
    if prev:
        d["init"] = f"{PHASE_DIR}/{prev}/model.safetensors"
    return d


TRAIN_SHELL = (
    "OMP_NUM_THREADS={threads} {PY} train --phase {wildcards.phase} --settings {params.settings:q}"
    " --codec {params.codec:q} --cache {input.cache:q} --heldout {input.heldout:q}"
    " {params.init} --out {PHASE_DIR}/{wildcards.phase} 2>&1 | tee {log}"
)


def init_arg(wc):
    prev = previous_phase(wc.phase)
    return f"--init {PHASE_DIR}/{prev}" if prev else ""


rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{PHASE_DIR}/{{phase}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/config.json",
    wildcard_constraints:
        phase="warmup|full",
    params:
        settings=lambda wc: phase_json(wc.phase),
        codec=codec_dir(),
        init=init_arg,
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
    output:
        model=f"{PHASE_DIR}/{{phase}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/config.json",
        lora=f"{PHASE_DIR}/{{phase}}/lora_weights.safetensors",
    wildcard_constraints:
        phase="lora",


rule export_final:
    input:
        model=f"{PHASE_DIR}/{PHASES[-1]}/model.safetensors",
        config=f"{PHASE_DIR}/{PHASES[-1]}/config.json",
        evaluation=f"{PHASE_DIR}/eval.json",
    output:
        final=f"{PHASE_DIR}/final.pt",
        model=f"{PHASE_DIR}/model.safetensors",
        config=f"{PHASE_DIR}/config.json",
    params:
        phase_dir=f"{PHASE_DIR}/{PHASES[-1]}",
    log:
        f"{LOGS}/export_final.log",
    benchmark:
        f"{BENCH}/export_final.tsv"
    shell:
        "{PY} export --phase-dir {params.phase_dir:q} --out {output.final:q} 2>&1 | tee {log}"
