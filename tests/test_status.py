"""`convscale sweep status`: cells per state, FLOPs done of planned, the ETA and the frontier so far,
read from a sweep folder with one cell in each state (support.make_status_sweep: numbers by hand)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from support import (STATUS_DONE, STATUS_MODEL_RATES, STATUS_PLANNED, STATUS_RATE, STATUS_REMAINING, STATUS_STARTUP,
                     env, make_status_sweep)

from convscale.fslock import FileLock
from convscale.sweep.progress import last_jsonl_row, read_progress


@contextlib.contextmanager
def holding(paths):
    locks = [FileLock(p) for p in paths]
    assert all(lock.acquire() for lock in locks)
    try:
        yield
    finally:
        for lock in locks:
            lock.release()


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sw"
    locks = make_status_sweep(root)
    with holding(locks):
        yield root


def test_progress_counts_flops_and_eta(sweep):
    p = read_progress(sweep)
    assert p.counts == {"done": 3, "running": 1, "failed": 1, "diverged": 1, "locked": 1, "pending": 1}
    assert p.planned_flops == STATUS_PLANNED and p.done_flops == STATUS_DONE
    assert p.remaining_flops == STATUS_REMAINING
    assert p.flops_per_second == pytest.approx(STATUS_RATE) and p.measured_cells == 6
    assert p.startup_seconds == pytest.approx(STATUS_STARTUP) and sum(c.to_start for c in p.cells) == 3
    # each model at its own rate (support.py: by hand): 2825 s of training + 3 x 10 s of start-up
    assert p.model_rates() == pytest.approx(STATUS_MODEL_RATES)
    assert p.training_seconds_left() == pytest.approx(2825.0)
    assert p.eta_seconds(1) == pytest.approx(2855.0) and p.eta_seconds(2) == pytest.approx(1427.5)


def _cell(cid, family, model, per_step, state="pending", done=0.0, seconds=0.0, planned=1e12):
    from convscale.sweep.progress import CellProgress

    return CellProgress(cid, family, state, planned, done, seconds, model=model, flops_per_step=per_step)


def test_unmeasured_models_take_their_familys_rate_by_flops_per_step(tmp_path):
    """Two measured NFNets 100x apart in FLOPs per step, 0.1 s per step each (pure overhead): a model
    between them is interpolated in log-log, one below takes the same seconds per step, one above the
    largest's FLOPs per second; a family with nothing measured uses the other family's models."""
    from convscale.sweep.progress import SweepProgress

    cells = [_cell("a", "nfnet", "small", 1e8, "done", 1e11, 100.0),  # 1e9 FLOPs/s
             _cell("b", "nfnet", "large", 1e10, "running", 1e13, 100.0),  # 1e11 FLOPs/s
             _cell("c", "nfnet", "mid", 1e9), _cell("d", "nfnet", "tiny", 1e7), _cell("e", "nfnet", "huge", 1e11),
             _cell("f", "vit", "v", 1e9)]
    p = SweepProgress(tmp_path, "s", cells)
    assert p.rate_of("nfnet", "mid", 1e9) == pytest.approx(1e10)
    assert p.rate_of("nfnet", "tiny", 1e7) == pytest.approx(1e8)
    assert p.rate_of("nfnet", "huge", 1e11) == pytest.approx(1e11)
    assert p.rate_of("vit", "v", 1e9) == pytest.approx(1e10)
    # remaining: b 0 (planned 1e12 < done), c/d/e/f 1e12 each -> 100 + 10000 + 10 + 100 s
    assert p.training_seconds_left() == pytest.approx(10210.0)
    # one sweep-wide rate (the FLOPs-weighted mean, 1.01e13 / 200 s) would say 79 s: the small model's
    # slowness per FLOP and the large one's speed both vanish into it
    assert p.flops_per_second == pytest.approx(1.01e13 / 200.0)


def test_eta_of_a_sweep_measured_on_its_small_models_only(tmp_path):
    """The first cells of a sweep are its smallest, slowest per FLOP: the ETA of the larger models'
    cells uses their own rate once they have a metrics row, not the small ones'."""
    from convscale.sweep.progress import SweepProgress

    small = [_cell(f"s{i}", "nfnet", "small", 1e8, "done", 1e11, 100.0) for i in range(4)]  # 1e9 FLOPs/s
    large = [_cell("l0", "nfnet", "large", 1e10, "running", 1e12, 10.0, planned=1e14)]  # 1e11 FLOPs/s
    large += [_cell(f"l{i}", "nfnet", "large", 1e10, planned=1e14) for i in range(1, 4)]
    p = SweepProgress(tmp_path, "s", small + large)
    assert p.eta_seconds(1) == pytest.approx((99e12 + 3e14) / 1e11)  # 3990 s
    assert p.flops_per_second == pytest.approx(1.4e12 / 410.0)  # alone it would say ~34 h


def test_progress_before_any_cell_trained_and_after_the_last(tmp_path):
    root = tmp_path / "sw"
    make_status_sweep(root)  # no lock held: the running and the locked cell read as pending
    for run in (root / "runs").iterdir():
        for f in run.iterdir():
            f.unlink()
    p = read_progress(root)
    assert p.counts["pending"] == 7 and p.counts["failed"] == 1
    assert p.flops_per_second is None and p.eta_seconds(4) is None
    from convscale.sweep.live import live_text

    assert live_text(p, 4) == "0/8 finished, 1 failed | ETA measuring (4 worker(s))"


def test_last_row_of_a_growing_metrics_file(tmp_path):
    f = tmp_path / "metrics.jsonl"
    assert last_jsonl_row(f) is None
    f.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert last_jsonl_row(f) == {"step": 2}
    assert last_jsonl_row(f, tail_bytes=8) is None  # the tail holds no whole row
    f.write_text('{"step": 1}\n{"step": 2}\n')
    assert last_jsonl_row(f) == {"step": 2}


def test_cli_prints_counts_flops_eta_and_frontier(sweep, cli):
    rc, out, err = cli(["sweep", "status", sweep, "--jobs", "2"])
    assert rc == 0, err
    assert "done 3, running 1, failed 1, diverged 1, locked 1, pending 1" in out
    assert "training FLOPs: 5.5e+12 done of 3.5e+13 planned (15.7%), 2.65e+13 to go" in out
    assert ("throughput: 1e+10 FLOPs/s per worker (7.5e+09 to 1.33e+10 over 3 model(s)), measured over 6 cell(s); "
            "start-up 10.0 s per cell") in out
    assert ("ETA: 23.8 min ((2.65e+13 FLOPs at each model's FLOPs/s = 47.1 min + 3 cell(s) to start x 10.0 s) "
            "/ 2 worker(s))") in out
    # the best done cell of each family at the one budget with done cells
    assert "frontier of nfnet (best held-out loss per budget so far):\n  1e+12 FLOPs  loss 1.8000  nfnet-b  lr 0.1  (2 run(s))" in out
    assert "frontier of vit (best held-out loss per budget so far):\n  1e+12 FLOPs  loss 2.5000  vit-a" in out
    rc, out, _ = cli(["sweep", "status", sweep])  # workers default to the cells running now: 1
    assert "ETA: 47.6 min" in out and "/ 1 worker(s)" in out
    assert cli(["sweep", "status", sweep, "--jobs", "0"])[0] == 2
    rc, _, err = cli(["sweep", "status", sweep / "nothing"])
    assert rc == 2 and "holds no sweep" in err


def test_cli_json_loads_no_torch(sweep):
    """`sweep status --json` in a fresh interpreter: the numbers for scripts, and no torch import."""
    code = ("import sys; from convscale.cli.main import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'sweep status imported torch'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "sweep", "status", str(sweep), "--json"], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    d = json.loads(done.stdout)
    assert d["counts"]["locked"] == 1 and d["cells"] == 8 and d["workers"] == 1
    assert (d["planned_flops"], d["done_flops"], d["remaining_flops"]) == (STATUS_PLANNED, STATUS_DONE, STATUS_REMAINING)
    assert d["flops_per_second_per_worker"] == pytest.approx(STATUS_RATE) and d["eta_seconds"] == pytest.approx(2855.0)
    assert d["flops_per_second_per_model"] == pytest.approx({m: r for (_, m), r in STATUS_MODEL_RATES.items()})
    assert d["startup_seconds"] == pytest.approx(STATUS_STARTUP) and d["cells_to_start"] == 3
    assert [(r["model"], r["loss"], r["compute_flops"]) for r in d["frontier"]["nfnet"]] == [("nfnet-b", 1.8, 1e12)]


def test_file_names_match_the_trainers():
    """The status reads the trainer's files by name without importing it (it loads torch)."""
    from convscale.sweep.progress import METRICS_FILE
    from convscale.sweep.sweepdir import RUN_LOCK_FILE
    from convscale.train.metrics import METRICS_FILE as TRAIN_METRICS
    from convscale.train.rundir import LOCK_FILE

    assert (RUN_LOCK_FILE, METRICS_FILE) == (LOCK_FILE, TRAIN_METRICS)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


UNFINISHED = {"nfb__C4e12", "vta__C4e12", "vtb__C4e12", "nfa__C16e12"}


def test_live_line_on_a_terminal_shows_the_status_eta(sweep):
    pytest.importorskip("tqdm")
    from convscale.sweep.live import LiveLine

    term, logged = Terminal(), []
    with LiveLine(sweep, UNFINISHED, workers=2, log=logged.append, stream=term, refresh_seconds=60) as line:
        line.write("[1/4] done        nfb__C4e12")
    text = term.getvalue()
    # the cells this sweep runs: 26.5e12 FLOPs to go, each at its model's rate measured over the whole
    # sweep (2825 s), and 3 of them to start at its measured 10 s each, over 2 workers
    assert "0/4 finished, 1 running, 1 failed, 1 locked | ETA 23.8 min (2 worker(s))" in text
    assert "[1/4] done        nfb__C4e12\n" in text and "\r" in text and logged == []
    assert "1.50T/28.0T FLOP" in text  # trained / planned FLOPs of those cells


def test_live_line_elsewhere_is_the_plain_lines(sweep):
    from convscale.sweep.live import LiveLine

    stream, logged = io.StringIO(), []
    with LiveLine(sweep, UNFINISHED, workers=2, log=logged.append, stream=stream) as line:
        line.write("[1/4] done        nfb__C4e12")
    assert logged == ["[1/4] done        nfb__C4e12"] and stream.getvalue() == ""


def test_frontier_before_any_budget_is_done_in_a_cooldown_sweep(monkeypatch, tmp_path):
    """While only cooldown trunks have finished (no budget's run yet), `sweep status` shows no
    frontier instead of failing on a table with nothing to fit (seen on the medium preset)."""
    import pandas as pd

    import convscale.sweep.results as results
    from convscale.cli.sweep_status import _frontiers

    trunk = dict(family="nfnet", model="nfnet-a", params=1e4, images_seen=1e6, train_flops=6e10, loss=3.0,
                 lr=0.8, budget_flops=float("nan"), status="done", role="trunk", cell_id="t")
    branch = dict(trunk, budget_flops=1e10, train_flops=1e10, status="pending", loss=float("nan"), role="branch",
                  cell_id="b")
    monkeypatch.setattr(results, "collect", lambda root: pd.DataFrame([trunk, branch]))
    assert _frontiers(tmp_path) == {}
    monkeypatch.setattr(results, "collect", lambda root: pd.DataFrame([trunk, dict(branch, status="done", loss=3.2)]))
    fr = _frontiers(tmp_path)
    assert list(fr) == ["nfnet"] and fr["nfnet"]["loss"].tolist() == [3.2]
