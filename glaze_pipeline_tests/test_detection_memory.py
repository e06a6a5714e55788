"""What detection keeps for a big table: one field set shared by the entities that want the same
fields, one key object per company, and no URL cached three times (pure units)."""

from glaze_pipeline.core import detection
from glaze_pipeline.core.detection import (
    ColumnSpec,
    EntityIndex,
    IdentifierColumns,
    targets_for_row,
)
from glaze_pipeline.core.fields import infer_field
from glaze_pipeline.core.models import EntityKey, EntityType


def _columns(*keys: str) -> list[ColumnSpec]:
    return [ColumnSpec(f"col_{key}", key, infer_field(key)) for key in keys]


IDS = IdentifierColumns.from_columns(_columns("name", "email", "company", "website"))


def test_entities_that_want_the_same_fields_share_one_set() -> None:
    columns = _columns("industry", "revenue")
    index = EntityIndex()
    for n in range(50):
        index.add(targets_for_row(f"r{n}", {"website": f"c{n % 10}.com"}, columns, IDS))
    assert len(index) == 10
    assert len({id(fields) for fields in index.fields.values()}) == 1
    assert all(fields == {"industry", "revenue"} for fields in index.fields.values())
    assert set(index.cells.values()) == {10}  # 5 rows x 2 cells each
    assert (index.cells_total, index.cells_without_identifier) == (100, 0)


def test_an_entity_asked_more_fields_later_gets_their_union_and_others_keep_theirs() -> None:
    index = EntityIndex()
    index.add(targets_for_row("r1", {"website": "acme.com"}, _columns("industry"), IDS))
    index.add(targets_for_row("r2", {"website": "beta.com"}, _columns("industry"), IDS))
    index.add(targets_for_row("r3", {"website": "acme.com"}, _columns("revenue"), IDS))
    acme = EntityKey(EntityType.COMPANY, "domain", "acme.com")
    beta = EntityKey(EntityType.COMPANY, "domain", "beta.com")
    assert index.fields == {acme: {"industry", "revenue"}, beta: {"industry"}}
    assert isinstance(index.fields[acme], frozenset)
    assert index.cells == {acme: 2, beta: 1}


def test_rows_of_one_company_share_one_key_object_and_its_url_is_not_cached_again() -> None:
    """The website key is cached on the cell's text; the URL and site behind it are not
    (they would hold each website twice more), so the URL cache does not grow."""
    detection._cached_website_key.cache_clear()
    detection._parse_short_url.cache_clear()
    columns = _columns("industry")
    website = "https://www.unique-company-4711.com/"
    [first] = targets_for_row("r1", {"website": website}, columns, IDS)
    [again] = targets_for_row("r2", {"website": "".join(website)}, columns, IDS)
    assert first.entity == EntityKey(EntityType.COMPANY, "domain", "unique-company-4711.com")
    assert again.entity is first.entity
    assert detection._parse_short_url.cache_info().currsize == 0
    # The other parsers still see the same domain through their own cache.
    assert detection.company_domain(website) == "unique-company-4711.com"


def test_a_row_asked_about_a_company_and_a_person_maps_each_cell_to_its_entity() -> None:
    row = {"website": "acme.com", "email": "ada@acme.com", "name": "Ada"}
    targets = targets_for_row("r1", row, _columns("industry", "title"), IDS)
    assert [(t.row_id, t.column.key, t.entity) for t in targets] == [
        ("r1", "industry", EntityKey(EntityType.COMPANY, "domain", "acme.com")),
        ("r1", "title", EntityKey(EntityType.PERSON, "email", "ada@acme.com")),
    ]
    assert all(type(t) is detection.CellTarget for t in targets)
