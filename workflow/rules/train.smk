# The phase chain (pipeline.settings.PHASE_CHAIN, declared in the schema's `train` section; today
# warmup: new block only -> full: whole decoder -> lora: one job per named adapter), each phase
# from the previous phase's output. A job's run settings are its params: changing one reruns that
# phase and, through their inputs, the later ones; its runtime knobs (workers, device, intervals)
# are a derived param (a function of `resources`), which Snakemake never reruns a job for. Step
# checkpoints live in <phase dir>/checkpoints/, NOT a declared output (Snakemake deletes declared
# outputs before a rerun), so a killed job rerun with --rerun-incomplete resumes from its last step.


# `trap '' TERM USR1`: on preemption SLURM signals every process of the job; the shell and tee
# ignore it, so the trainer can finish its step, write a checkpoint and exit on its own terms.
TRAIN_SHELL = (
    "trap '' TERM USR1; OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} train --phase {params.phase}"
    " --settings {params.settings:q} --runtime {params.runtime:q} --codec {params.codec:q}"
    " --target-rate {params.target_rate} --cache {input.cache:q} --heldout {input.heldout:q}"
    " {params.init} {params.select} --out {params.out:q} 2>&1 | tee {log}"
)


# LINT (common.smk): no conda env or container, {PY} in the shell text
rule train:
    input:
        unpack(train_inputs),
    output:
        model=f"{PHASE_DIR}/{{phase}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/config.json",
    wildcard_constraints:
        phase="|".join(SINGLE_JOB_PHASES),
    params:
        phase=lambda wc: wc.phase,
        settings=lambda wc: run_json(job_of(wc)),
        runtime=lambda wc, resources: runtime_json(job_of(wc)),
        codec=codec_dir(),
        target_rate=TARGET_RATE,
        init=lambda wc: init_arg(job_of(wc)),
        select=lambda wc: select_arg(job_of(wc)),
        out=lambda wc: job_dir(job_of(wc)),
    threads: 2
    resources:
        gpu=lambda wc: settings_of(job_of(wc))["nproc_per_node"],     # the processes torchrun starts
    log:
        f"{LOGS}/train/{{phase}}.log",
    benchmark:
        f"{BENCH}/train/{{phase}}.tsv"
    shell:
        TRAIN_SHELL


# the same job for each named adapter of a phase with adapters (lora): params follow the wildcards
# LINT (common.smk): no conda env or container, {PY} in the shell text
use rule train as train_lora with:
    output:
        model=f"{PHASE_DIR}/{{phase}}/{{adapter}}/model.safetensors",
        config=f"{PHASE_DIR}/{{phase}}/{{adapter}}/config.json",
        lora=f"{PHASE_DIR}/{{phase}}/{{adapter}}/lora_weights.safetensors",
    wildcard_constraints:
        phase="|".join(ADAPTER_PHASES),
    log:
        f"{LOGS}/train/{{phase}}-{{adapter}}.log",
    benchmark:
        f"{BENCH}/train/{{phase}}-{{adapter}}.tsv"


# LINT (common.smk): no conda env or container, {PY} in the shell text, hard-coded param source
rule export_final:
    input:
        model=f"{final_source()}/model.safetensors",
        evaluation=f"{PHASE_DIR}/eval.json",
        # the report's items (report.smk) come with final.pt, so that `snakemake --report` works
        # after the README's main command
        report=report_targets(),
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
