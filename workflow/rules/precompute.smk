# manifest -> N shards by a stable hash of the id -> one job per shard -> results/<cache>/shard-NNN.zarr
# A shard job's inputs are the manifests (ancient: editing one line must not rerun every shard)
# and the codec files (changing the codec reruns every shard). Its audio files are NOT inputs (a
# million declared inputs cost minutes per Snakemake invocation and per cluster job): two params
# carry what changed, a digest of the shard's rows (editing one line reruns only that line's
# shard) and a digest of its audio files' sizes and mtimes (rewriting, replacing or touching one
# file reruns only its shard). See common.smk (shard_index) and pipeline/data/manifest.py.


# LINT (common.smk): no conda env or container, {PY} in the shell text, hard-coded param codec
rule precompute_shard:
    input:
        manifest=shard_manifests,
        codec=codec_files(),
    output:
        directory(f"{RESULTS}/{{cachedir}}/shard-{{shard}}.zarr"),
    params:
        rows=lambda wc: (shard_index(shard_split(wc)).rows_digest(int(wc.shard))
                         if evaluated_here("precompute_shard", wc) else NOT_EVALUATED),
        audio=lambda wc: (shard_index(shard_split(wc)).audio_digest(int(wc.shard))
                          if evaluated_here("precompute_shard", wc) else NOT_EVALUATED),
        n_shards=lambda wc: SPLITS[shard_split(wc)]["shards"],
        settings=json.dumps(precompute_settings(), sort_keys=True),
        runtime=lambda wc, resources: json.dumps(precompute_runtime()),   # no rerun
        codec=codec_dir(),
    threads: 2
    log:
        f"{LOGS}/precompute/{{cachedir}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/precompute/{{cachedir}}-{{shard}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} precompute-shard --manifest {input.manifest:q}"
        " --shard {wildcards.shard} --n-shards {params.n_shards} --codec {params.codec:q}"
        " --out {output:q} --settings {params.settings:q} --runtime {params.runtime:q} 2>&1 | tee {log}"


# LINT (common.smk): no conda env or container, {PY} and {RESULTS} in the shell text
rule precompute_summary:
    input:
        manifest=lambda wc: manifest_of(SUMMARY_SPLIT[wc.sdir]),
        shards=lambda wc: shard_paths(SUMMARY_SPLIT[wc.sdir]),
    output:
        summary=f"{RESULTS}/{{sdir}}/summary.json",
        rejects=f"{RESULTS}/{{sdir}}/rejects.jsonl",
    log:
        f"{LOGS}/{{sdir}}/summary.log",
    benchmark:
        f"{BENCH}/{{sdir}}/summary.tsv"
    shell:
        "{PY} precompute-summary --manifest {input.manifest:q} --out-dir {RESULTS}/{wildcards.sdir}"
        " {input.shards:q} 2>&1 | tee {log}"
