"""convscale.fileio: atomic writes, JSON and JSON-lines reading, strict-JSON cleaning."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from convscale.fileio import (
    TMP_PREFIX,
    append_jsonl,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_clean,
    jsonl_line,
    read_json,
    read_jsonl,
)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic_write_json(target, {"b": 1, "a": [1.5, None]}) == target  # the folder is created
    assert target.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    atomic_write_text(target, "é\n")
    assert target.read_bytes() == "é\n".encode("utf-8")
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")

    def half_then_fail(p):
        p.write_text("half a ro")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_atomic_write_callback_gets_a_temporary_in_the_same_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "model.bin", lambda p: (seen.append(p), p.write_bytes(b"xyz")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(TMP_PREFIX + "model.bin.")
    assert (tmp_path / "model.bin").read_bytes() == b"xyz"


def test_atomic_write_gives_the_mode_an_ordinary_open_would(tmp_path):
    """Not mkstemp's 0600: a report or fit on a shared cluster stays readable by the group."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain)


def test_json_layout_options(tmp_path):
    p = atomic_write_json(tmp_path / "f.json", {"z": "ü", "a": 1}, indent=1, sort_keys=False, ensure_ascii=False)
    assert p.read_text(encoding="utf-8") == '{\n "z": "ü",\n "a": 1\n}\n'
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "g.json", {"x": math.nan}, allow_nan=False)
    assert not (tmp_path / "g.json").exists()


def test_read_json_none_when_missing_or_torn(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    assert read_json(tmp_path / "missing.json" / "below") is None
    (tmp_path / "torn.json").write_text('{"a": [1, 2')
    assert read_json(tmp_path / "torn.json") is None
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    assert read_json(tmp_path / "bin.json") is None
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}


def test_jsonl_append_and_read_back_strict(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": math.nan, "lr": np.float32(0.5)})
    append_jsonl(path, {"step": 2, "loss": math.inf, "n": np.int64(7)})
    assert path.read_text() == '{"step": 1, "loss": null, "lr": 0.5}\n{"step": 2, "loss": null, "n": 7}\n'
    assert read_jsonl(path) == [{"step": 1, "loss": None, "lr": 0.5}, {"step": 2, "loss": None, "n": 7}]
    assert jsonl_line([1, (2, 3)]) == "[1, [2, 3]]\n"


@pytest.mark.parametrize("tail", [b'{"step": 3, "lo', "{\"step\": 3, \"name\": \"\u00e9".encode()[:-1], b"\n"])
def test_read_jsonl_drops_a_torn_last_line(tmp_path, tail):
    """A killed writer leaves a partial line (even half a UTF-8 character): the rows before it stay."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n' + tail)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_read_jsonl_missing_or_empty(tmp_path):
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    assert read_jsonl(tmp_path) == []  # a folder where the file should be
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


def test_json_clean():
    got = json_clean({1: np.float64(np.nan), "b": (np.bool_(True), np.int32(4), -np.inf),
                      "c": np.array([[1.0, np.nan]]), "d": [None, "s", 2.5, True]})
    assert got == {"1": None, "b": [True, 4, None], "c": [[1.0, None]], "d": [None, "s", 2.5, True]}
    assert type(got["b"][0]) is bool and type(got["b"][1]) is int
    json.dumps(got, allow_nan=False)
