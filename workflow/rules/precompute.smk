# manifest -> N shards by a stable hash of the id -> one job per shard -> results/<cache>/shard-NNN.zarr
# A shard job's inputs are its own audio files (touching one reruns only its shard) and the
# codec files (changing the codec reruns every shard); its rows enter as a digest param
# (editing one line reruns only that line's shard).


rule precompute_shard:
    input:
        audio=lambda wc: [r.audio for r in shard_of_split(CACHE_SPLIT[wc.cachedir], int(wc.shard))
                          if os.path.isfile(r.audio)],
        codec=codec_files(),
    output:
        directory(f"{RESULTS}/{{cachedir}}/shard-{{shard}}.zarr"),
    params:
        rows=lambda wc: rows_digest(shard_of_split(CACHE_SPLIT[wc.cachedir], int(wc.shard))),
        manifest=lambda wc: manifest_of(CACHE_SPLIT[wc.cachedir]),
        n_shards=lambda wc: SPLITS[CACHE_SPLIT[wc.cachedir]]["shards"],
        settings=json.dumps(precompute_settings(), sort_keys=True),
        codec=codec_dir(),
    threads: 2
    log:
        f"{LOGS}/precompute/{{cachedir}}-{{shard}}.log",
    benchmark:
        f"{BENCH}/precompute/{{cachedir}}-{{shard}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} OMP_WAIT_POLICY=PASSIVE {PY} precompute-shard --manifest {params.manifest:q}"
        " --shard {wildcards.shard} --n-shards {params.n_shards} --codec {params.codec:q}"
        " --out {output:q} --settings {params.settings:q} 2>&1 | tee {log}"


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
