"""Hostile JSONL task files: every bad line is a DataError naming the file and line, never a raw parser error."""
import pytest

from pelthub.errors import DataError
from pelthub.tasks.io import load_jsonl

BAD_LINES = {
    "5000-digit label": '{"text": "a", "label": ' + "9" * 5000 + "}",
    "nesting 100000 deep": "[" * 100_000 + "]" * 100_000,
    "NaN label": '{"text": "a", "label": NaN}',
    "not an object": "[1, 2]",
}


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_hostile_line_is_a_data_error_naming_file_and_line(tmp_path, line):
    path = tmp_path / "target.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n' + line + "\n")
    with pytest.raises(DataError) as caught:
        load_jsonl(path)
    assert type(caught.value) is DataError and "target.jsonl" in str(caught.value) and "line 2" in str(caught.value)
