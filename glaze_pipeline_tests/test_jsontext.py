"""The hot paths' JSON: orjson's speed, the json module's behaviour where orjson refuses."""

import json
import math
from datetime import UTC, datetime

import pytest

from glaze_pipeline.core import jsontext

STANDARD = json.JSONEncoder(default=str, check_circular=False, separators=(",", ":"))


@pytest.mark.parametrize(
    "value",
    [
        {"industry": "Software", "employee_count": 120, "score": 0.1 + 0.2, "tags": [None, True]},
        {"name": "Straße GmbH", "emoji": "🚀", "quote": 'say "hi"\n'},
        {1: "int key", None: "null key", 2.5: "float key"},
        {"when": datetime(2026, 11, 24, 6, 0, tzinfo=UTC)},  # str(), as default=str writes it
        {"wide": 2**70},  # wider than 64 bits: orjson refuses, the json module writes it
    ],
)
def test_written_values_read_back_as_the_json_module_writes_them(value: object) -> None:
    text = jsontext.dumps(value)
    assert json.loads(text) == json.loads(STANDARD.encode(value))
    assert jsontext.loads(text) == json.loads(text)
    assert jsontext.dumps_bytes(value).decode() == text


def test_what_only_the_json_module_reads_is_still_read_and_garbage_still_refused() -> None:
    assert math.isnan(jsontext.loads('{"x": NaN}')["x"])  # a vendor's non-standard JSON
    assert (
        jsontext.loads(b'{"n": 123456789012345678901234567890}')["n"]
        == 123456789012345678901234567890
    )
    with pytest.raises(ValueError):
        jsontext.loads("<html>not json</html>")


def test_a_user_s_long_number_reads_back_exact() -> None:
    """orjson would read an integer wider than 64 bits as a float: a 20-digit id in a row must
    not come back rounded (the json module reads text with such a run of digits)."""
    row = '{"crm_id": 98765432109876543210, "phone": "+4915112345678", "n": 42}'
    assert jsontext.loads(row) == {
        "crm_id": 98765432109876543210,
        "phone": "+4915112345678",
        "n": 42,
    }
    assert jsontext.loads(row.encode())["crm_id"] == 98765432109876543210
    assert jsontext.dumps(jsontext.loads(row)) == row.replace(": ", ":").replace(", ", ",")
