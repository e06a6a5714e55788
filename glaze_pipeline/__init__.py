"""Glaze pipeline: the enrichment engine of Glaze."""
