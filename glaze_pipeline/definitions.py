"""The one Definitions object: `workspace.yaml` and `dagster ... -m glaze_pipeline.definitions`."""

from dagster import Definitions

from glaze_pipeline.defs.assets import GLAZE_ASSETS
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import EnrichmentProviders, GlazeDatabase

defs = Definitions(
    assets=GLAZE_ASSETS,
    jobs=[enrich_table],
    resources={
        "glaze_db": GlazeDatabase(),
        "providers": EnrichmentProviders(),
    },
)
