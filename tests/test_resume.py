"""Kill a real `python -m convscale train` with SIGKILL after its first checkpoint, resume it with
the same command, and compare with an uninterrupted run: identical losses, bit for bit (CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convscale.train.metrics import read_metrics

from support import REPO, env
STEPS = 80


def command(run_dir: Path) -> list[str]:
    # digits: scikit-learn's bundled real images, served deterministically by step
    return [sys.executable, "-m", "convscale", "train", "--run-dir", str(run_dir), "--model", "nfnet-tiny",
            "--data", "digits", "--resolution", "16", "--batch-size", "32", "--steps", str(STEPS), "--lr", "0.2",
            "--agc-exempt-scalar-gains", "--threads", "1", "--quiet", "--set", "checkpoint_every_steps=10",
            "--set", "checkpoint_every_seconds=0", "--set", "log_every_steps=5", "--set", "eval_every_steps=40"]


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    # one thread each: the uninterrupted run and the victim run side by side on two cores
    full = subprocess.Popen(command(full_dir), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(killed_dir), env=env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_root = killed_dir / "checkpoints"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and victim.poll() is None:
        if ckpt_root.is_dir() and any(p.name.startswith("step-") for p in ckpt_root.iterdir()):
            break
        time.sleep(0.005)
    time.sleep(0.15)  # a few steps on: rows past the checkpoint (and maybe a checkpoint write) get cut off
    if victim.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {victim.stderr.read().decode()[-2000:]}")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "result.json").exists()
    killed_at = max(r["step"] for r in read_metrics(killed_dir / "metrics.jsonl"))
    assert 0 < killed_at < STEPS
    print(f"killed at step {killed_at}/{STEPS}; checkpoints: {sorted(p.name for p in ckpt_root.iterdir())}")

    resumed = subprocess.run(command(killed_dir), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stderr
    _, full_err = full.communicate(timeout=300)
    assert full.returncode == 0, full_err[-2000:]

    r_full = json.loads((full_dir / "result.json").read_text())
    r_resumed = json.loads((killed_dir / "result.json").read_text())
    assert r_full["status"] == r_resumed["status"] == "done"
    for key in ("heldout_loss", "heldout_top1", "heldout_top5", "steps", "images_seen", "train_flops"):
        assert r_resumed[key] == r_full[key], key  # exact equality: bit-identical
    rows_full = [(r["kind"], r["step"], r.get("loss"), r.get("heldout_loss")) for r in
                 read_metrics(full_dir / "metrics.jsonl")]
    rows_resumed = [(r["kind"], r["step"], r.get("loss"), r.get("heldout_loss")) for r in
                    read_metrics(killed_dir / "metrics.jsonl")]
    assert rows_resumed == rows_full  # no duplicated or missing steps, same numbers

    # the same command on a finished run reports its result and exits 0
    again = subprocess.run(command(killed_dir), env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["heldout_loss"] == r_full["heldout_loss"]
