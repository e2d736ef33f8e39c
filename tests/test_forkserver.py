"""Cells forked from a warm process (sweep/executors/forkserver.py) behave as `convscale train` subprocesses."""

from __future__ import annotations

import os
import sys
import time

import pytest

from support import SWEEP_STUDY, env

pytestmark = [
    pytest.mark.slow,  # a server process imports torch
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cells are forked on Linux only"),
]


@pytest.fixture
def server():
    from convscale.sweep.executors.forkserver import ForkServer

    s = ForkServer(env())
    yield s
    s.close()


def _lock(path):
    from convscale.sweep.locking import CellLock

    lock = CellLock(path)
    assert lock.acquire()
    return lock


def test_a_forked_command_has_its_exit_code_and_log_files(server, tmp_path):
    from convscale import __version__

    lock = _lock(tmp_path / "a.lock")
    out, err = tmp_path / "out", tmp_path / "err"
    assert server.launch(["--version"], str(out), str(err), lock.fd).wait(timeout=120) == 0
    assert __version__ in out.read_text()
    cell = server.launch(["bogus"], str(out), str(err), lock.fd)
    assert cell.wait(timeout=60) == 2 and cell.poll() == 2
    assert "invalid choice" in err.read_text()  # argparse's usage error, appended to the same file
    assert __version__ in out.read_text()
    lock.release()


def test_a_forked_cell_holds_its_lock_and_a_sigterm_ends_it_interrupted_and_resumable(server, tmp_path):
    from convscale.status import EXIT_INTERRUPTED
    from convscale.sweep.locking import is_locked
    run = tmp_path / "run"
    lock_path = tmp_path / "cell.lock"
    lock = _lock(lock_path)
    argv = ["train", "--run-dir", str(run), "--model", "nfnet-tiny", "--steps", "100000", "--batch-size", "8",
            "--data", "procedural", "--resolution", "16", "--num-classes", "10", "--precision", "fp32",
            "--checkpoint-every-steps", "5", "--set", "log_every_steps=1", "--set", "data.heldout_images=64"]
    cell = server.launch(argv, str(tmp_path / "out"), str(tmp_path / "err"), lock.fd)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 12:
        assert cell.poll() is None, (tmp_path / "err").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.close(lock.fd)  # the sweep's copy gone (as when it is killed): the cell's process still holds it
    lock.fd = None
    assert is_locked(lock_path)
    cell.terminate()
    assert cell.wait(timeout=60) == EXIT_INTERRUPTED
    assert not is_locked(lock_path)
    assert "interrupted" in (tmp_path / "err").read_text()
    assert any(p.name.startswith("step-") for p in (run / "checkpoints").iterdir())


def test_a_sweep_forks_its_cells_and_they_equal_subprocess_cells(tmp_path, monkeypatch):
    from convscale.sweep import LocalExecutor, SweepDir, collect, load_study, plan_study
    from convscale.sweep.executors import forkserver

    launched = []
    real = forkserver.ForkServer.launch
    monkeypatch.setattr(forkserver.ForkServer, "launch",
                        lambda self, argv, *a: launched.append(argv[0]) or real(self, argv, *a))
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(forkserver.FORK_ENV, raising=False)
    (tmp_path / "s.toml").write_text(SWEEP_STUDY.format(budgets="images = [256, 512]"))
    plan = plan_study(load_study(tmp_path / "s.toml"))
    losses = {}
    for fork in (True, False):
        sweep = SweepDir(tmp_path / f"sweep-{fork}")
        sweep.prepare(plan)
        out = LocalExecutor(jobs=2, threads=1, gpus=0, fork=fork).run(sweep.root, [c.cell_id for c in plan.cells])
        assert sorted(o.status for o in out) == ["done"] * len(plan.cells), [o.message for o in out]
        losses[fork] = collect(sweep.root).set_index("cell_id")["loss"].sort_index()
    assert launched == ["train"] * len(plan.cells)  # every cell of the first sweep was forked, none of the second
    assert list(losses[True]) == list(losses[False])  # the same runs, bit for bit


def test_a_server_that_cannot_start_leaves_its_cells_to_subprocesses(tmp_path, monkeypatch, capsys):
    from convscale.sweep import LocalExecutor, SweepDir, collect, load_study, plan_study
    from convscale.sweep.executors import forkserver

    monkeypatch.setattr(forkserver, "_SERVER_MAIN", "import sys; sys.exit(3)")  # a server that dies at once
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    (tmp_path / "s.toml").write_text(SWEEP_STUDY.format(budgets="images = [256]"))
    plan = plan_study(load_study(tmp_path / "s.toml"))
    sweep = SweepDir(tmp_path / "sweep")
    sweep.prepare(plan)
    ids = [c.cell_id for c in plan.cells][:2]
    out = LocalExecutor(jobs=1, threads=1, gpus=0).run(sweep.root, ids)
    assert [o.status for o in out] == ["done", "done"], [o.message for o in out]
    err = capsys.readouterr().err
    assert err.count("the cell fork server did not start") == 1  # said once; the next cell goes straight to a subprocess
    assert (collect(sweep.root)["status"] == "done").sum() == 2


def test_a_server_whose_sweep_has_gone_ends_quietly(server, tmp_path, capfd):
    """The sweep closes its end while a cell runs (it is stopping, and a cell started just before the
    stop): when the cell ends, the server's report goes nowhere, and the server exits without a
    traceback."""
    import socket

    lock = _lock(tmp_path / "cell.lock")
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--model", "vit-tiny", "--steps", "100000", "--batch-size", "8",
            "--data", "procedural", "--resolution", "16", "--num-classes", "10", "--precision", "fp32",
            "--set", "log_every_steps=1", "--set", "data.heldout_images=64"]
    cell = server.launch(argv, str(tmp_path / "out"), str(tmp_path / "err"), lock.fd)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():
        assert cell.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-2000:]
        time.sleep(0.1)
    server.sock.shutdown(socket.SHUT_RDWR)  # the connection ends (a plain close would wait for the reader)
    os.kill(cell.pid, 15)
    assert cell.wait(timeout=60) < 0  # the sweep's side no longer hears how it ended: counted as killed
    assert server.proc.wait(timeout=60) == 0
    assert "Traceback" not in capfd.readouterr().err
    lock.release()
