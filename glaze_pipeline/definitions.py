"""The one Definitions object: `workspace.yaml` and `dagster ... -m glaze_pipeline.definitions`."""

from dagster import Definitions

from glaze_pipeline.defs.ai_jobs import AI_JOB_DEFS
from glaze_pipeline.defs.assets import GLAZE_ASSETS
from glaze_pipeline.defs.checks import GLAZE_ASSET_CHECKS, data_checks
from glaze_pipeline.defs.executors import glaze_executor
from glaze_pipeline.defs.io_manager import StepOutputsIOManager
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import (
    EnrichmentProviders,
    GlazeDatabase,
    LanguageModel,
    PreEnrichment,
    ProgressChannel,
    RequestLiveness,
)
from glaze_pipeline.defs.sensors import GLAZE_SENSORS, pre_enrich_schedule


def build_definitions(
    database_url: str | None = None, providers_file: str | None = None
) -> Definitions:
    """The engine's definitions; the arguments override the environment (CLI and tests).

    Jobs without an executor of their own get `glaze_executor` (in process unless the run's
    config picks multiprocess or Celery: defs/executors.py); `io_manager` hands step outputs
    over through the Glaze database when steps run elsewhere, in memory otherwise
    (defs/io_manager.py).
    """
    glaze_db = GlazeDatabase(url=database_url)
    return Definitions(
        assets=GLAZE_ASSETS,
        asset_checks=GLAZE_ASSET_CHECKS,
        jobs=[enrich_table, *AI_JOB_DEFS, data_checks],
        sensors=GLAZE_SENSORS,
        schedules=[pre_enrich_schedule],
        executor=glaze_executor,
        resources={
            "glaze_db": glaze_db,
            "io_manager": StepOutputsIOManager(glaze_db=glaze_db),
            "providers": EnrichmentProviders(config_file=providers_file),
            "progress": ProgressChannel(),
            "pre_enrichment": PreEnrichment(),
            "request_liveness": RequestLiveness(),
            "llm": LanguageModel(),
        },
    )


defs = build_definitions()
