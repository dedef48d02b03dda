"""The fault table of issue 8, one test per row: each reproduces the fault as a user meets it and
asserts the user-facing message (one line, no traceback, non-zero exit), or the bound that now
holds. Rows are added by whoever fixes them; this file holds those of config validation and of the
inference CLIs (`resynth`, `decode`)."""
from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

from workflow_util import make_tree, snakemake


# ---- a typo under codec.demo.config / codec.demo.lambdas ---------------------------------------
@pytest.fixture(scope="module")
def code_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("wf") / "code")


@pytest.mark.parametrize("override, key, where", [
    ("codec: {demo: {config: {decoder_dmi: 64}}}\n", "decoder_dmi", "['codec']['demo']['config']"),
    ("codec: {demo: {lambdas: {mle: 2.0}}}\n", "mle", "['codec']['demo']['lambdas']"),
])
def test_typo_under_demo_codec_fails_at_parse_time(code_tree, override, key, where):
    """Before: passed the schema; the demo_codec job failed with a traceback after Snakemake had
    deleted the existing codec. Now Snakemake refuses the config, naming the key, before any job."""
    (code_tree / "typo.yaml").write_text(override)
    r = snakemake(code_tree, configfiles=("fast.yaml", "typo.yaml"), extra=("-n",))
    assert r.rc != 0 and not r.jobs and "Building DAG" not in r.out, r.out[-3000:]
    assert f"'{key}' was unexpected" in r.out and f"On instance{where}" in r.out, r.out[-3000:]
    assert not (code_tree / "results").exists()


def test_demo_codec_schema_lists_what_the_code_takes():
    """The schema's keys are exactly SNAC's constructor arguments and the loss terms, and the
    embedded config passes it (a wrong type fails)."""
    import jsonschema
    from pipeline.model.codec import SNAC_KEYS
    from pipeline.training.losses import LOSS_TERMS
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    demo = schema["properties"]["codec"]["properties"]["demo"]["properties"]
    assert set(demo["config"]["properties"]) == set(SNAC_KEYS)
    assert set(demo["lambdas"]["properties"]) == set(LOSS_TERMS)
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    jsonschema.validate(cfg, schema)
    cfg["codec"]["demo"]["lambdas"]["mel"] = "2"
    with pytest.raises(jsonschema.ValidationError, match="'2' is not of type 'number'"):
        jsonschema.validate(cfg, schema)
