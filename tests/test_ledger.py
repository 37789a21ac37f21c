"""The experiment's ledger (results.jsonl) under a crash, a full disk or a stray edit: whole
records only, damaged lines reported by file and line and never glued onto."""
from __future__ import annotations

import json

import pytest

from ckaad_fast.experiments.ledger import append_record, read_ledger


def test_a_torn_last_line_is_closed_before_the_next_record(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"run_id": "a", "auc": 0.9})
    with open(path, "ab") as f:
        f.write(b'{"run_id": "b", "au')  # a crash mid-write
    with pytest.warns(RuntimeWarning, match=r"results\.jsonl.*line 2: not a whole JSON record"):
        assert [r["run_id"] for r in read_ledger(path).records] == ["a"]
    append_record(path, {"run_id": "b", "auc": 0.8})
    ledger = read_ledger(path, warn=False)
    assert [r["run_id"] for r in ledger.records] == ["a", "b"]
    assert [(p.line, p.reason.split(" (")[0]) for p in ledger.problems] == [(2, "not a whole JSON record")]


def test_foreign_and_undecodable_lines_are_skipped_naming_them(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"run_id": "a"}\n123\n{"foo": 1}\n\xff\xfe broken\n\n{"run_id": "b"}\n')
    ledger = read_ledger(path, warn=False)
    assert [r["run_id"] for r in ledger.records] == ["a", "b"]
    assert [p.line for p in ledger.problems] == [2, 3, 4]
    assert "not UTF-8" in ledger.problems[2].reason and "int without a run_id" in ledger.problems[0].reason
    assert str(path) in ledger.report() and "made again" in ledger.report()


def test_a_missing_ledger_is_empty_and_records_are_whole_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    assert read_ledger(path).records == []
    append_record(path, {"run_id": "x", "note": "ü"})
    assert path.read_bytes().endswith(b"\n") and json.loads(path.read_text(encoding="utf-8"))["note"] == "ü"


def test_damaged_lines_are_set_aside_once_and_kept(tmp_path):
    from ckaad_fast.experiments.ledger import set_aside

    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"run_id": "a"}\n{"run_id": "b", "au\n{"foo": 1}\n')
    aside = set_aside(read_ledger(path, warn=False))
    assert aside.read_bytes() == b'{"run_id": "b", "au\n{"foo": 1}\n'
    assert path.read_text() == '{"run_id": "a"}\n' and read_ledger(path, warn=False).problems == []
    assert set_aside(read_ledger(path, warn=False)) is None
