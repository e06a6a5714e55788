"""Thin Dagster adapters over `glaze_pipeline.core`: resources, ops and the job, assets."""
