"""The meter archive CSV: thousands of rows, and a bad one is named by file and line."""

from __future__ import annotations

import pytest

from gateway.archive import ArchiveError, load_csv


def test_loads_rows_with_defaults(tmp_path):
    path = tmp_path / "meters.csv"
    path.write_text("address,link,edition,area,customer\n1,bus1,2007,A1,c-1\n000000000002,bus2,1997,,\n")
    meters = load_csv(path)
    assert [(m.address, m.link, m.edition, m.area) for m in meters] == [
        ("000000000001", "bus1", 2007, "A1"), ("000000000002", "bus2", 1997, "")]


@pytest.mark.parametrize(("body", "message"), [
    ("address,link\n1,bus1\n12345678901234,bus1\n", ":3: address"),
    ("address,link\nAAAA00000001,bus1\n", ":2: address"),
    ("address,link,edition\n1,bus1,2001\n", ":2: edition"),
    ("address,bus\n1,bus1\n", ":1: missing column"),
    ("address,link,colour\n1,bus1,red\n", ":1: unknown column"),
])
def test_bad_rows_name_file_and_line(tmp_path, body, message):
    path = tmp_path / "meters.csv"
    path.write_text(body)
    with pytest.raises(ArchiveError, match=message):
        load_csv(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArchiveError, match="cannot read"):
        load_csv(tmp_path / "nope.csv")
