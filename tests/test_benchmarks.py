"""The benchmark scripts run: benchmarks/gpu_check.py's sections in their --tiny CPU form (the
GPU check itself needs a GPU), with a failing section (no timm here) shown, not fatal; the JPEG
decode benchmark on a few images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_sections_smoke_run_on_cpu(tmp_path, capsys, monkeypatch):
    gc = _load("gpu_check")
    monkeypatch.setattr(gc, "timm_model", lambda *a: (_ for _ in ()).throw(RuntimeError("timm unavailable (test)")))
    rows = str(tmp_path / "rows.jsonl")
    for argv in (["peak"], ["procedural-sync"], ["throughput", "--family", "vit"], ["largest-batch"]):
        gc.main([*argv, "--out", rows, "--tiny"])
    got = [json.loads(line) for line in Path(rows).read_text().splitlines()]
    by = {(r["section"], r.get("impl")): r for r in got}
    assert by[("peak", None)]["status"] == "ok" and by[("peak", None)]["bf16_matmul_tflops"] > 0
    assert by[("procedural-sync", None)]["dtype"] == "torch.float32"
    ours = by[("throughput", "ours")]
    assert ours["status"] == "ok" and ours["images_per_second"] > 0 and 0 < ours["mfu"] < 1
    assert by[("throughput", "timm")]["status"].startswith("error: RuntimeError: timm unavailable")
    big = by[("largest-batch", "ours")]
    assert big["status"] == "ok" and big["batch"] == 8 and big["checkpointed_blocks"] == 3
    capsys.readouterr()
    gc.main(["table", rows, "--expect", "peak", "nccl"])
    table = capsys.readouterr().out
    assert "missing (timed out or crashed" in table and "timm unavailable" in table and "goal vit-b16" in table


def test_jpeg_decode_benchmark_measures_both_decoders_on_both_sources(capsys):
    jd = _load("jpeg_decode")
    jd.main(["--images", "8", "--seconds", "0.01", "--rounds", "1", "--resolutions", "32", "--batch-size", "4"])
    out = capsys.readouterr().out
    rows = [line.split(",") for line in out.splitlines() if line.startswith(("folder,", "shards,"))]
    assert {(r[0], r[2]) for r in rows} >= {("folder", "pil"), ("shards", "pil")}
    assert all(float(r[3]) > 0 for r in rows)
    assert "cores to feed a GPU training NFNet-F0 at 441 images/s" in out


def test_cell_startup_benchmark_runs_both_ways_and_prints_the_ratio(capsys):
    import pytest

    if not __import__("sys").platform.startswith("linux"):
        pytest.skip("cells are forked on Linux only")
    cs = _load("cell_startup")
    cs.main(["--model", "vit-tiny", "--cells", "2", "--steps", "1", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = dict(line.split(",")[:2] for line in out.splitlines() if line.startswith(("forked,", "subprocess,")))
    assert set(rows) == {"forked", "subprocess"} and all(float(v) > 0 for v in rows.values())
    assert "subprocess / forked, median seconds per cell:" in out
