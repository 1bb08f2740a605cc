"""read_manifest refuses, in one line, what it would otherwise read wrong: a column name given twice (pandas
renamed the second 'text.1' and extract kept it as metadata) and a file that is not UTF-8 (pandas' decode error
counted its byte within a read chunk)."""
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featx.data.manifest import read_manifest
from featx.errors import FeatxError

REPEATED = r"manifest m\.\w+: column 'text' is given twice \(columns: id, text, text\); give each column once"


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_a_column_name_given_twice_is_refused_in_csv_and_tsv(tmp_path, ext):
    sep = "\t" if ext == "tsv" else ","
    path = tmp_path / f"m.{ext}"
    path.write_text(sep.join(["id", "text", "text"]) + "\n" + sep.join(["a", "x", "y"]) + "\n", encoding="utf-8")
    with pytest.raises(FeatxError, match=REPEATED):
        read_manifest(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())   # behind a BOM too
    with pytest.raises(FeatxError, match=REPEATED):
        read_manifest(path)


def test_a_real_dotted_name_and_blank_names_are_not_repeats(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,text,text.1,,\na,x,y,1,2\n", encoding="utf-8")
    assert list(read_manifest(path).columns[:3]) == ["id", "text", "text.1"]


def test_a_key_given_twice_is_refused_in_json_lines_and_json(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "x", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(FeatxError, match=REPEATED):
        read_manifest(path)
    path = tmp_path / "m.json"
    path.write_text('[{"id": "a", "text": "x", "text": "y"}]', encoding="utf-8")
    with pytest.raises(FeatxError, match=REPEATED):
        read_manifest(path)
    # a repeated key inside a value is not a column
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "x"})[:-1] + ', "meta": {"k": 1, "k": 2}}\n', encoding="utf-8")
    assert list(read_manifest(path).columns) == ["id", "text", "meta"]


def test_a_column_name_given_twice_is_refused_in_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], names=["id", "text", "text"]),
                   path)
    with pytest.raises(FeatxError, match=REPEATED):
        read_manifest(path)
    pd.DataFrame({"id": ["a"], "text": ["x"]}).to_parquet(path)
    assert list(read_manifest(path).columns) == ["id", "text"]


@pytest.mark.parametrize("ext,lines", [("csv", ["id,text", "a,x", "b,y", "c,caf\xe9"]),
                                       ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "text": "caf\xe9"}'])])
def test_a_manifest_that_is_not_utf8_names_its_line_and_how_to_re_encode(tmp_path, ext, lines):
    path = tmp_path / f"m.{ext}"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(FeatxError) as got:
        read_manifest(path)
    assert str(got.value) == (f"manifest {path} is not UTF-8 text: line {len(lines)} holds byte 0xe9, which UTF-8 "
                              f"cannot decode; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 m.{ext} > "
                              f"utf8-m.{ext})")


def test_extract_says_a_repeated_column_and_a_non_utf8_file_in_one_line(tmp_path, capsys):
    from featx.cli.main import main

    path = tmp_path / "m.csv"
    for content in (b"id,text,text\na,x,y\n", b"id,text\na,caf\xe9\n"):
        path.write_bytes(content)
        assert main(["extract", str(path), "--model", "no-such/model", "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("given twice" in err[0] or "line 2 holds byte 0xe9" in err[0]), err
        assert not (tmp_path / "out").exists()
