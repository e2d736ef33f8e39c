"""Cells forked from a warm process: torch and the trainer are imported once per job slot, not per cell.

A fresh `convscale train` process spends ~2.5-3.5 s on 2 CPU cores before its first step, most of
it importing torch and torch._dynamo (every torch.optim optimizer imports it on first use). A sweep
of small CPU cells pays that for each cell: 72 cells of 3-100 s in the quick demo. The local
executor therefore starts one server per job slot on a CPU: a process that imports the trainer and
then waits; each cell is a fork of it running ``convscale train`` exactly as the subprocess would
(its own session, SIGTERM handler, log files, exit code, and the cell's lock descriptor, passed
over a Unix socket). The server never runs a torch op, so no thread pool or device is set up
before the fork; it is started with the slot's environment (OMP_NUM_THREADS is read when the
OpenMP runtime loads, before any fork).

Not used on GPUs (a CUDA context does not survive a fork, and GPU cells are long), with a custom
train command, off Linux, or with ``CONVSCALE_FORK_CELLS=0``: there cells are plain subprocesses.

Protocol (one cell at a time per server): the sweep sends one JSON line ``{"argv", "out", "err"}``
with the lock descriptor attached; the server answers ``{"pid"}`` once forked and ``{"pid",
"returncode"}`` (Popen's convention: -N for signal N) once the cell's process has ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

FORK_ENV = "CONVSCALE_FORK_CELLS"


class ForkServerError(RuntimeError):
    """The server could not be started or answered nonsense: run the cell as a subprocess instead."""
_MAX_MESSAGE = 1 << 20


def available(environ=os.environ) -> bool:
    """Whether cells may be forked here: Linux with fork, and not switched off by the environment."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds")
            and environ.get(FORK_ENV, "1").strip().lower() not in ("0", "false", "no", "off"))


def _send(sock: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = (json.dumps(obj) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


class _Lines:
    """Newline-framed JSON messages from a socket (and the descriptors that came with them)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def read(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next message; None at end of stream; socket.timeout when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            data, fds, _, _ = socket.recv_fds(self.sock, _MAX_MESSAGE, 4)
            self.fds += fds
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# --- the sweep's side ----------------------------------------------------------------------------

class ForkedCell:
    """A cell's process forked by a server, with the part of Popen's interface the executor uses
    (``pid``, ``wait``, ``poll``, ``terminate``, ``kill``, ``returncode``). A thread reads the
    server's report of its end, so any thread may wait on it (the sweep's Ctrl-C waits too)."""

    def __init__(self, server: "ForkServer", pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: Optional[int] = None
        self._ended = threading.Event()
        threading.Thread(target=self._read_end, daemon=True, name=f"cell-{pid}").start()

    def _read_end(self) -> None:
        try:
            msg = self.server.lines.read()
        except (OSError, ValueError):
            msg = None
        if msg is None or "returncode" not in msg:  # the server died: its fork got SIGTERM from it
            self.server.broken = True
            end = time.monotonic() + 30.0
            while time.monotonic() < end and _alive(self.pid):
                time.sleep(0.05)
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = int(msg["returncode"])
        self._ended.set()

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"cell pid {self.pid}", timeout)
        return self.returncode

    def poll(self) -> Optional[int]:
        return self.returncode if self._ended.is_set() else None

    def send_signal(self, sig: int) -> None:
        if not self._ended.is_set():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (its parent, the server, has not reaped it yet) has ended
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ForkServer:
    """One warm server process (one job slot). ``launch`` forks a cell from it; one cell at a time."""

    def __init__(self, env: dict[str, str], preexec_fn=None) -> None:
        self.env = env
        self.preexec_fn = preexec_fn
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self.lines: Optional[_Lines] = None
        self.broken = False
        self.disabled = False  # it failed to start: the slot's cells run as subprocesses
        self._lock = threading.Lock()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER_MAIN, str(theirs.fileno())],
                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True, preexec_fn=self.preexec_fn)
        finally:
            theirs.close()
        self.sock, self.lines, self.broken = ours, _Lines(ours), False

    def launch(self, argv: list[str], out_path: str, err_path: str, lock_fd: int) -> ForkedCell:
        """Fork ``convscale <argv>`` with stdout/stderr appended to the two paths and ``lock_fd``
        held by the cell's process. Starts (or restarts) the server first when needed."""
        with self._lock:
            for attempt in range(2):
                if self.proc is None or self.broken or self.proc.poll() is not None:
                    self.close()
                    self._start()
                try:
                    _send(self.sock, {"argv": argv, "out": out_path, "err": err_path}, (lock_fd,))
                    msg = self.lines.read()
                except OSError:
                    msg = None
                if msg is not None and "pid" in msg:
                    return ForkedCell(self, int(msg["pid"]))
                self.broken = True
            raise ForkServerError("the cell fork server did not start (its error is above); cells run as plain "
                                  "subprocesses from now on (set CONVSCALE_FORK_CELLS=0 to say so up front)")

    def close(self) -> None:
        """End the server (it exits when its socket closes; SIGTERM if it does not)."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


# --- the server's side ---------------------------------------------------------------------------

def _die_with(parent_pid: int) -> None:
    """SIGTERM to this process when ``parent_pid`` (its parent) dies; exit now if it already has."""
    from convscale.sweep.executors.cell import _die_with_parent

    _die_with_parent(parent_pid)()


def _child(argv: list[str], out_path: str, err_path: str, lock_fd: int, server_pid: int,
           sock: socket.socket) -> None:
    """In the fork: become the cell's `convscale train` process; never returns."""
    code = 1
    try:
        from convscale import signals

        signals.install()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores it; a cell does not
        sock.close()
        os.setsid()
        _die_with(server_pid)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.set_inheritable(lock_fd, True)  # held to the end, passed on to anything it execs
        sys.argv = ["convscale", *argv]
        from convscale.cli.main import entry

        entry()  # ends by sys.exit: its exit handler then ends the process with the command's code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    try:
        import atexit

        atexit._run_exitfuncs()  # as at a normal exit; entry's handler calls os._exit(code) last
    finally:
        os._exit(code)


def _wait_status(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return -signal.SIGKILL
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)


def serve(fd: int) -> None:
    """The server: import what a cell needs, then fork one cell per request until the socket closes."""
    parent = os.getppid()
    _die_with(parent)
    sock = socket.socket(fileno=fd)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim imports it at an optimizer's first use)

    import convscale.cli.main  # noqa: F401
    import convscale.cli.train  # noqa: F401
    import convscale.train.loop  # noqa: F401

    try:
        _serve(sock)
    except OSError:  # the sweep has gone (closed its end, or was killed): so does its server, quietly
        return


def _serve(sock: socket.socket) -> None:
    lines = _Lines(sock)
    while True:
        msg = lines.read()
        if msg is None:
            return
        fds, lines.fds = lines.fds, []
        if len(fds) != 1:
            for f in fds:
                os.close(f)
            _send(sock, {"error": f"expected 1 lock descriptor, got {len(fds)}"})
            continue
        lock_fd = fds[0]
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(msg["argv"], msg["out"], msg["err"], lock_fd, server_pid, sock)
        os.close(lock_fd)
        _send(sock, {"pid": pid})
        _send(sock, {"pid": pid, "returncode": _wait_status(pid)})


def main(fd: int) -> None:
    """The server process's entry (``_SERVER_MAIN``)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep's Ctrl-C is the sweep's to handle
    serve(fd)


# not `-m` this module: the executors package imports it, and runpy would then run a second copy
_SERVER_MAIN = "import sys; from convscale.sweep.executors.forkserver import main; main(int(sys.argv[1]))"
