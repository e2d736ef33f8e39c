"""Fixtures the test files share. Plain helpers and constants are in support.py.

The quick inner loop is ``python3 -m pytest -m "not slow"`` (under a minute on 2 cores); the
``slow`` mark is on every test that takes more than ~10 s there (subprocess training runs,
torchrun, sweeps killed and resumed, the demo, the browser).
"""

from __future__ import annotations

from typing import Callable

import pytest


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """``cli(["train", "--steps", 2, ...])``: run `convscale ARGV` in this process; (exit code, stdout, stderr)."""
    from convscale.cli.main import main

    def run(argv: list) -> tuple[int, str, str]:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, usage errors
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err

    return run
