"""How one cell runs, whatever executor started it (local.py, slurm.py).

Every cell is one `convscale train` subprocess on its own run dir (on Slurm with N GPUs per
cell, one torchrun of N processes), guarded by its lock file:
finished cells (done / diverged) are skipped, a cell locked by another sweep is skipped and
reported, anything else runs (a crashed or killed run resumes from its last checkpoint). A cell
whose process exits with a code other than 0 (done) or 3 (diverged) is recorded as failed, with
the last line it wrote to stderr, and the sweep goes on. Ctrl-C or SIGTERM to the sweep stops
every running cell by SIGTERM (they exit as "interrupted" and resume next time); a sweep killed
outright takes its cells with it (parent-death signal, Linux).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from convscale.fileio import atomic_write_json
from convscale.sweep.locking import CellLock
from convscale.sweep.sweepdir import FINISHED, SweepDir

from convscale.status import EXIT_DIVERGED, EXIT_DONE, EXIT_INTERRUPTED  # noqa: E402


@dataclass(frozen=True)
class Resources:
    """What one cell's process gets: CPU threads, or one GPU."""

    threads: int = 1
    gpu: Optional[str] = None  # value for CUDA_VISIBLE_DEVICES; None = CPU run

    @property
    def devices(self) -> int:
        """Devices counted for device-hours: 1 GPU, or the CPU cores used."""
        return 1 if self.gpu is not None else self.threads

    @property
    def device_kind(self) -> str:
        return "gpu" if self.gpu is not None else "cpu-core"

    def env(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env


@dataclass(frozen=True)
class CellOutcome:
    """What happened to one cell in this sweep invocation."""

    cell_id: str
    status: str  # done | diverged | failed | interrupted | skipped (finished before) | locked (runs elsewhere)
    exit_code: Optional[int] = None
    seconds: float = 0.0
    message: str = ""


def _last_line(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    # progress bars end lines with \r; the last real message is the last non-empty piece
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_cell(
    root: str | Path,
    cell_id: str,
    resources: Resources = Resources(),
    train_command: Optional[list[str]] = None,
    server=None,
) -> CellOutcome:
    """Run (or resume, or skip) one cell in the sweep dir ``root``. Safe to call from many processes.
    ``server``: a ``forkserver.ForkServer`` started with this slot's environment, to fork the cell
    from instead of starting a subprocess (the same process, without ~3 s of imports)."""
    sweep = SweepDir(root)
    state = sweep.state(cell_id)
    if state in FINISHED:
        return CellOutcome(cell_id, "skipped", message=f"already {state}")
    lock = CellLock(sweep.lock_path(cell_id))
    if not lock.acquire():
        return CellOutcome(cell_id, "locked", message=f"running elsewhere (lock {sweep.lock_path(cell_id)} is held)")
    try:
        res = sweep.result(cell_id)  # another sweep may have finished it just before we took the lock
        if res is not None and res.get("status") in FINISHED:
            return CellOutcome(cell_id, "skipped", message=f"already {res['status']}")
        out_path, err_path = sweep.log_paths(cell_id)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            sweep.launch_path(cell_id),
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
             "threads": resources.threads, "gpu": resources.gpu,
             "devices": resources.devices, "device_kind": resources.device_kind},
        )
        cmd = sweep.train_command(cell_id, train_command)
        # a cell is a run of its own: it must not join the process group of a torchrun/srun step
        # this sweep may itself run in (it would wait for ranks that never come)
        env = cell_env(resources)
        start = time.monotonic()
        with open(out_path, "ab") as out, open(err_path, "ab") as err:
            err_offset = err.tell()
            # the lock descriptor goes to the child too: if this sweep dies, the cell stays locked
            # until the training process itself ends, which it does at once (SIGTERM on parent
            # death, Linux). Its own session: a terminal's Ctrl-C reaches the sweep, which stops
            # its children once, by SIGTERM (stop_children), as it does for a SIGTERM of its own.
            proc = None
            if server is not None and not server.disabled and train_command is None and cmd[1:3] == ["-m", "convscale"]:
                from convscale.sweep.executors.forkserver import ForkServerError

                try:
                    proc = server.launch(cmd[3:], str(out_path), str(err_path), lock.fd)
                except ForkServerError as e:
                    server.disabled = True
                    print(f"convscale: warning: {e}", file=sys.stderr)
            if proc is None:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        pass_fds=(lock.fd,), start_new_session=True,
                                        preexec_fn=_die_with_parent(os.getpid()))
            with _children_lock:
                _children[proc.pid] = proc
            try:
                rc = proc.wait()
            except BaseException:
                _stop(proc)
                raise
            finally:
                with _children_lock:
                    _children.pop(proc.pid, None)
        seconds = time.monotonic() - start
        last = _last_line(err_path, err_offset)
        if rc in (EXIT_DONE, EXIT_DIVERGED):
            res = sweep.result(cell_id)
            if res is not None and res.get("status") in FINISHED:
                sweep.failure_path(cell_id).unlink(missing_ok=True)
                loss = res.get("heldout_loss")
                msg = f"held-out loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
                if res["status"] == "diverged":
                    why = res.get("diverged_reason") or f"at step {res.get('steps', '?')}"
                    msg = f"diverged {why}; rerun it at a lower lr"
                return CellOutcome(cell_id, res["status"], rc, seconds, msg)
            last = f"exit code {rc} but no finished result.json in {sweep.run_dir(cell_id)}" + (f"; {last}" if last else "")
        if rc < 0 or rc == EXIT_INTERRUPTED:  # killed by a signal / Ctrl-C: not the cell's fault, resumes next time
            return CellOutcome(cell_id, "interrupted", rc, seconds, last)
        atomic_write_json(sweep.failure_path(cell_id),
                          {"exit_code": rc, "last_stderr_line": last, "seconds": seconds, "time": time.time(),
                           "stderr_log": str(err_path)})
        return CellOutcome(cell_id, "failed", rc, seconds, last)
    finally:
        lock.release()


def cell_env(resources: Resources) -> dict[str, str]:
    """The environment of a cell's process: this one's, out of any torchrun/srun step, plus ``resources``."""
    from convscale.train.distributed import single_process_env  # here: importing an executor loads no torch

    return {**single_process_env(os.environ), **resources.env()}


def visible_gpus(environ=os.environ) -> Optional[list[str]]:
    """The GPU ids this process may use (``CUDA_VISIBLE_DEVICES``, indices or UUIDs), or None if unset."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# training processes running now, by pid: the main thread stops them on Ctrl-C or SIGTERM
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()
PR_SET_PDEATHSIG = 1


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when the sweep dies, even by SIGKILL (Linux)."""

    def preexec() -> None:  # in the child between fork and exec: nothing that may take a lock
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the sweep died before prctl took effect
            os._exit(EXIT_INTERRUPTED)

    return preexec


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (train stops cleanly and releases its locks), SIGKILL if it has not ended in ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_children() -> None:
    """Stop every training process this sweep started (each one gets SIGTERM, at once)."""
    with _children_lock:
        procs = list(_children.values())
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
