"""Assets for lineage: each table's enriched cells, fed by its rows and the entity cache.

The job materializes `enriched_table` for the table's partition (dynamic: one per table id)
and `entity_cache` when it bought new answers, with the figures a user wants as metadata.
"""

from dagster import AssetKey, AssetSpec, DynamicPartitionsDefinition

TABLE_PARTITIONS_NAME = "glaze_tables"
TABLE_PARTITIONS = DynamicPartitionsDefinition(name=TABLE_PARTITIONS_NAME)

TABLE_ROWS = AssetKey(["glaze", "table_rows"])
ENTITY_CACHE = AssetKey(["glaze", "entity_cache"])
ENRICHED_TABLE = AssetKey(["glaze", "enriched_table"])

table_rows = AssetSpec(
    TABLE_ROWS,
    description="Rows users uploaded to a Glaze table (written by the app).",
    partitions_def=TABLE_PARTITIONS,
    group_name="glaze",
    kinds={"postgres"},
)
entity_cache = AssetSpec(
    ENTITY_CACHE,
    description="Provider answers by (entity, provider): the cache that makes re-runs free.",
    group_name="glaze",
    kinds={"postgres"},
)
enriched_table = AssetSpec(
    ENRICHED_TABLE,
    description="A table's enriched cells with confidence and provenance, one partition per table.",
    deps=[TABLE_ROWS, ENTITY_CACHE],
    partitions_def=TABLE_PARTITIONS,
    group_name="glaze",
    kinds={"postgres"},
)

GLAZE_ASSETS = [table_rows, entity_cache, enriched_table]
