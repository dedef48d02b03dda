# Phase 11: SNAC 24 kHz -> 48 kHz decoder for the same codes. The package `pipeline` is the
# program (every rule runs `python -m pipeline <command>`); this file is only the DAG.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


# Defaults are not filled in here: pipeline/settings.py reads them from the schema and layers each
# phase's settings (filling them into train.defaults and every phase would override the former).
validate(config, "workflow/schemas/config.schema.yaml", set_default=False)


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
