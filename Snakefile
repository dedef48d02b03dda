# Phase 11: SNAC 24 kHz -> 48 kHz decoder for the same codes. The package `pipeline` is the
# program (every rule runs `python -m pipeline <command>`); this file is only the DAG.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/precompute.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
        report_targets(),
