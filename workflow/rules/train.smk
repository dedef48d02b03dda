# The phase chain (pipeline.settings.PHASE_CHAIN): warmup (new block only) -> full (whole
# decoder) -> lora/<adapter> (one job per named adapter), each from the previous phase's output.
# A phase's run settings are its params: changing one reruns that phase and, through their
# inputs, the later ones; its runtime knobs (workers, device, intervals) are a derived param
# (a function of `resources`), which Snakemake never reruns a job for. Step checkpoints live in
# <phase dir>/checkpoints/, NOT a declared output (Snakemake deletes declared outputs before a
# rerun), so a killed job rerun with --rerun-incomplete resumes from its last step.


def previous_phase_dir(phase):
    prev = PHASE_CHAIN[phase]
    return f"{PHASE_DIR}/{prev}" if prev else None


def train_inputs(wc):
    d = dict(codec=codec_files(), cache=shard_paths("train"), heldout=shard_paths("heldout"))
    prev = previous_phase_dir(getattr(wc, "phase", "lora"))
    if prev:
        d["init"] = f"{prev}/model.safetensors"
    return d


# `trap '' TERM USR1`: on preemption SLURM signals every process of the job; the shell and tee
# ignore it, so the trainer can finish its step, write a checkpoint and exit on its own terms.
TRAIN_SHELL = (
    "trap '' TERM USR1; OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} train --phase {params.phase}"
    " --settings {params.settings:q} --runtime {params.runtime:q} --codec {params.codec:q}"
    " --target-rate {params.target_rate} --cache {input.cache:q} --heldout {input.heldout:q}"
    " {params.init} {params.select} --out {params.out:q} 2>&1 | tee {log}"
)


rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{PHASE_DIR}/{{phase}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/config.json",
    wildcard_constraints:
        phase="|".join(p for p in PHASES if p != "lora"),
    params:
        phase=lambda wc: wc.phase,
        settings=lambda wc: run_json(wc.phase),
        runtime=lambda wc, resources: runtime_json(wc.phase),
        codec=codec_dir(),
        target_rate=TARGET_RATE,
        init=lambda wc: f"--init {previous_phase_dir(wc.phase)}" if previous_phase_dir(wc.phase) else "",
        select=lambda wc: select_arg(wc.phase),
        out=lambda wc: f"{PHASE_DIR}/{wc.phase}",
    threads: 2
    resources:
        gpu=lambda wc: settings_of(wc.phase)["nproc_per_node"],     # the processes torchrun starts
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
        settings=lambda wc: run_json("lora", wc.adapter),
        runtime=lambda wc, resources: runtime_json("lora", wc.adapter),
        codec=codec_dir(),
        target_rate=TARGET_RATE,
        init=lambda wc: f"--init {previous_phase_dir('lora')} --adapter {wc.adapter}",
        select=lambda wc: select_arg("lora", wc.adapter),
        out=lambda wc: f"{PHASE_DIR}/lora/{wc.adapter}",
    resources:
        gpu=lambda wc: settings_of("lora", wc.adapter)["nproc_per_node"],
    log:
        f"{LOGS}/train/lora-{{adapter}}.log",
    benchmark:
        f"{BENCH}/train/lora-{{adapter}}.tsv"


rule export_final:
    input:
        model=f"{final_source()}/model.safetensors",
        evaluation=f"{PHASE_DIR}/eval.json",
        # the report's items (report.smk) come with final.pt, so that `snakemake --report` works
        # after the README's main command; a function, as report.smk is included after this file
        report=lambda wc: report_targets(),
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
