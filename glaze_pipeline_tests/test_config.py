"""The run config of `enrich_table` is checked where the user types it (Launchpad, CLI)."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterInvalidConfigError, validate_run_config

from glaze_pipeline.core import queue
from glaze_pipeline.core.cache_redis import DEFAULT_TTL, RedisAnswerCache
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.models import AI_REQUEST_KINDS, RequestKind
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.config import EnrichTableConfig, JobKind
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import EnrichmentProviders

BAD_KIND = (
    "Value at path root:ops:detect_entities:config:kind not in enum type JobKind got enrich_all"
)


def run_config(**config: object) -> dict[str, object]:
    return {"ops": {"detect_entities": {"config": {"table_id": "tbl_x", **config}}}}


def test_the_config_kinds_are_the_request_kinds_spelled_as_sent() -> None:
    # Dagster matches config enums by member name: names must be the values callers send.
    enrich_kinds = [kind for kind in RequestKind if kind not in AI_REQUEST_KINDS]
    assert [(kind.name, kind.value) for kind in JobKind] == [
        (kind.value, kind.value) for kind in enrich_kinds
    ]
    for kind in enrich_kinds:
        validated = validate_run_config(enrich_table, run_config(whole_table=True, kind=kind.value))
        config = EnrichTableConfig(**validated["ops"]["detect_entities"]["config"])
        assert config.request_kind() is kind
    assert EnrichTableConfig(table_id="t").request_kind() is RequestKind.ENRICH


def test_a_bad_kind_is_rejected_at_config_validation_in_one_line() -> None:
    with pytest.raises(DagsterInvalidConfigError) as error:
        validate_run_config(enrich_table, run_config(whole_table=True, kind="enrich_all"))
    assert [e.message for e in error.value.errors] == [BAD_KIND]


def test_dagster_job_execute_rejects_a_bad_kind_before_any_run(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(run_config(whole_table=True, kind="enrich_all")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(tmp_path), GLAZE_HOME=str(tmp_path / ".glaze"))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    command = [str(Path(sys.executable).parent / "dagster"), "job", "execute"]
    command += ["-m", "glaze_pipeline.definitions", "-j", "enrich_table", "-c", str(config_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert BAD_KIND in result.stderr + result.stdout
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_runs_count() == 0


def test_a_knob_left_out_of_the_run_config_is_the_engines_default() -> None:
    """One home for the defaults (JobSettings): the Launchpad, the CLI and the bench agree."""
    validated = validate_run_config(enrich_table, run_config(whole_table=True))
    config = EnrichTableConfig(**validated["ops"]["detect_entities"]["config"])
    assert config.settings() == JobSettings()
    assert EnrichTableConfig(table_id="t").settings() == JobSettings()


def test_a_typed_config_becomes_a_run_config_of_what_was_set() -> None:
    config = EnrichTableConfig(
        table_id="tbl_x", whole_table=True, kind=JobKind.pre_enrich, budget=5.0
    )
    assert config.op_config() == {
        "table_id": "tbl_x",
        "whole_table": True,
        "kind": "pre_enrich",
        "budget": 5.0,
    }
    job_name, run_config = queue.job_run(config.request_kind(), config.op_config())
    assert job_name == enrich_table.name
    validate_run_config(enrich_table, run_config)


def test_the_redis_tier_keeps_each_providers_answers_for_its_configured_ttl(
    sqlite_store: Store, redis_url: str
) -> None:
    providers = EnrichmentProviders(
        redis_url=redis_url, cache_ttl_by_provider={"fake_company": 60.0}
    )
    with providers.sharing(sqlite_store) as sharing:
        [redis_tier] = [t for t in sharing.cache.tiers if isinstance(t, RedisAnswerCache)]
        assert redis_tier.ttl_for("fake_company", found=True) == timedelta(seconds=60)
        assert redis_tier.ttl_for("fake_company", found=False) == timedelta(seconds=60)
        assert redis_tier.ttl_for("fake_person", found=True) == DEFAULT_TTL
