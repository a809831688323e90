"""A user's calibration / evaluation text that cannot be read is named: file, where, and why."""

import re

import pytest

from awp_jax import data


def test_non_utf8_txt_names_the_file_offset_and_format(tmp_path):
    p = tmp_path / "corpus.txt"
    good = "first line\nsecond line, café\n".encode("utf-8")
    p.write_bytes(good + "third line ¨ in latin-1".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        data.read_text(p)
    msg = str(info.value)
    assert isinstance(info.value, data.DataError)
    assert str(p) in msg
    offset = len(good) + len("third line ")
    assert f"byte offset {offset}" in msg and "0xa8" in msg and "(line 3)" in msg
    assert "UTF-8" in msg and ".txt" in msg and ".jsonl" in msg and '{"text": ...}' in msg


def test_non_utf8_jsonl_names_the_file_and_offset(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=re.escape(str(p)) + r" is not UTF-8 text: byte 0xe9 at byte offset 28 \(line 2\)"):
        data.read_text(p)


def test_offset_counts_a_byte_order_mark(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfab\xa8")
    with pytest.raises(data.DataError, match=r"byte 0xa8 at byte offset 5 \(line 1\)"):
        data.read_text(p)


def test_load_text_on_a_path_gives_the_same_error(tmp_path):
    p = tmp_path / "gbk.txt"
    p.write_bytes("中文".encode("gbk"))
    with pytest.raises(data.DataError, match=r"gbk\.txt is not UTF-8 text: byte 0xd6 at byte offset 0"):
        data.load_text(str(p))


@pytest.mark.parametrize("line, why", [
    ("{not json}", r"but the line is not JSON \(Expecting property name"),
    ('{"txt": "typo"}', r"got an object with keys \['txt'\]"),
    ('"just a string"', r"got a JSON string"),
    ('["a", "b"]', r"got a JSON array"),
    ("null", r"got a JSON null"),
    ('{"text": 42}', r"got a 'text' that is a JSON number, not a string"),
    ('{"text": ["a"]}', r"got a 'text' that is a JSON array"),
])
def test_bad_jsonl_line_names_the_file_and_line(tmp_path, line, why):
    p = tmp_path / "corpus.jsonl"
    p.write_text('{"text": "one"}\n\n' + line + '\n{"text": "four"}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match=re.escape(f"{p}:3: expected a JSON object with a 'text' field on line 3, ") + why):
        data.read_text(p)


def test_good_files_still_read(tmp_path):
    t = tmp_path / "a.txt"
    t.write_bytes("\ufeffline one\r\nline two\rline three\n".encode("utf-8"))
    assert data.read_text(t) == "line one\nline two\nline three\n"  # BOM dropped, newlines as text mode reads them
    j = tmp_path / "a.jsonl"
    j.write_bytes('\ufeff{"text": "α"}\r\n\r\n{"text": "b\\nc", "id": 2}\n'.encode("utf-8"))
    assert data.read_text(j) == "α\n\nb\nc"


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="holds no text"):
        data.read_text(tmp_path / "empty.jsonl")
    with pytest.raises(data.DataError, match="text file not found"):
        data.read_text(tmp_path / "missing.txt")
