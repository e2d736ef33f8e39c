"""Faults and bad inputs (issue 15): what a new user's mistakes and a hostile machine get.

Each regression test below names the item of the issue it pins. Then a table-driven suite in the
spirit of SQLite's: every CLI entry point against malformed values, every input file kind
truncated / corrupted / empty, run and sweep directories that are files, read-only or full, and
(test_sweep_kills, slow) a sweep killed by SIGTERM and SIGKILL at random moments and rerun.

A user error ends as one line "convscale...: error: ... " naming the fix, exit code 2, no
traceback (``assert_user_error``). Everything runs in-process through ``cli.main.main`` except
what needs a real process (locks held by another process, signals, kills).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from support import REPO, convscale, env
from convscale.train.metrics import read_metrics

MODEL = ["--model", "vit-w8-d4-p4", "--resolution", "16"]
TINY = [*MODEL, "--batch-size", "8", "--num-classes", "4", "--quiet", "--threads", "1",
        "--set", "data.heldout_images=16", "--set", "checkpoint_every_seconds=0"]


def assert_user_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one error line, the last one, without a traceback; returns it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    for n in needles:  # a flag may be named as its field: --weight-decay as weight_decay
        forms = {n, n.lstrip("-").replace("-", "_"), n.replace("_", "-")}
        assert any(f in errors[0] for f in forms), (n, errors[0])
    return errors[0]


def train(run_dir: Path, *extra, steps: int = 2) -> list[str]:
    return ["train", "--run-dir", run_dir, *TINY, "--steps", steps, *extra]


# ---------------------------------------------------------------------------------------------
# 1. data loss: --restart removes only a directory that proves it is a run


def test_restart_never_removes_a_folder_that_is_not_a_run(tmp_path, cli):
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.txt").write_text("x")
    rc, _, err = cli(train(d, "--restart"))
    assert_user_error(rc, err, "nothing was removed")
    assert (d / "thesis.txt").read_text() == "x"
    rc, _, err = cli(train(d))  # without --restart the error no longer suggests it
    assert "--restart" not in assert_user_error(rc, err, "holds no run")


def test_restart_of_a_run_with_foreign_files_removes_nothing_and_of_a_clean_run_restarts(tmp_path, cli):
    d = tmp_path / "run"
    assert cli(train(d))[0] == 0
    (d / "notes.txt").write_text("mine")
    rc, _, err = cli(train(d, "--restart"))
    assert_user_error(rc, err, "notes.txt")
    assert (d / "result.json").is_file() and (d / "notes.txt").is_file()
    (d / "notes.txt").unlink()
    first = json.loads((d / "result.json").read_text())
    (d / "result.json").write_text(json.dumps({**first, "heldout_loss": 99.0}))  # mark: must be rewritten
    rc, out, err = cli(train(d, "--restart"))
    assert rc == 0, err
    again = json.loads((d / "result.json").read_text())
    assert again["heldout_loss"] == first["heldout_loss"] and json.loads(out)["heldout_loss"] == first["heldout_loss"]


# ---------------------------------------------------------------------------------------------
# 2. silent mislabelling: links in a folder dataset


def _png(colour) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(b, "PNG")
    return b.getvalue()


def _folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i}.png").write_bytes(_png((80 * c, 10 * i, 0)))
    return root


@pytest.mark.parametrize("link, target", [("c0/up", ".."), ("c0/other", "../c1"), ("c1/self", "."),
                                         ("c2/twin.png", "../c1/0.png")])
def test_folder_links_that_loop_or_cross_classes_are_refused(tmp_path, link, target):
    from convscale.data.config import DataConfig
    from convscale.data.folder import FolderSource
    from convscale.errors import UserError

    root = _folder(tmp_path / "root")
    os.symlink(target, root / link)
    with pytest.raises(UserError, match="link|same file"):
        FolderSource(DataConfig(kind="folder", path=str(root), resolution=16))


def test_folder_link_out_of_the_data_is_followed(tmp_path):
    from convscale.data.config import DataConfig
    from convscale.data.folder import FolderSource

    root = _folder(tmp_path / "root")
    extra = _folder(tmp_path / "elsewhere", classes=1, per_class=2) / "c0"
    os.symlink(extra, root / "c1" / "more")
    src = FolderSource(DataConfig(kind="folder", path=str(root), resolution=16, heldout_fraction=0.25))
    assert src.num_train_images + src.num_heldout_images == 14


# ---------------------------------------------------------------------------------------------
# 3. uncounted loss: cut shards, skips per distinct file


def _shard(path: Path, n: int, labels=None) -> Path:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            label = str(i % 2 if labels is None else labels[i]).encode()
            for name, data in ((f"s{i:03d}.png", _png((12 * i, 0, 0))), (f"s{i:03d}.cls", label)):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.mark.parametrize("cut", ["half", "header", "end_marker"])
def test_a_cut_shard_is_an_error_not_a_silent_half(tmp_path, cut, cli):
    full = _shard(tmp_path / "b.tar", 20).read_bytes()
    size = {"half": len(full) // 2 + 100, "header": 512 * 7, "end_marker": len(full) - 2 * 512 - 4096}[cut]
    size = size if cut != "end_marker" else _end_of_members(tmp_path / "b.tar")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.tar").write_bytes(full[:size])
    rc, _, err = cli(train(tmp_path / "run", "--data", "shards", "--data-path", tmp_path / "t",
                           "--set", "data.heldout_fraction=0.3"))
    assert_user_error(rc, err, "b.tar", "cut short")


def _end_of_members(path: Path) -> int:
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
        return last.offset_data + -(-last.size // 512) * 512  # every member whole, the end marker gone


def test_skipped_images_are_counted_per_distinct_file(tmp_path):
    from convscale.data.config import DataConfig
    from convscale.data.folder import FolderSource

    root = _folder(tmp_path / "root", classes=2, per_class=3)
    (root / "c0" / "bad.png").write_bytes(b"not an image")
    src = FolderSource(DataConfig(kind="folder", path=str(root), resolution=16, heldout_fraction=0.0))
    it = src.train_batches(7)
    for _ in range(5):  # five epochs: bad.png is drawn five times
        next(it)
    assert src.skipped_images == 1


# ---------------------------------------------------------------------------------------------
# 4. unlocked runs


def test_a_run_directory_trains_in_one_process_at_a_time(tmp_path, cli):
    from convscale.fslock import FileLock, is_locked

    d = tmp_path / "run"
    d.mkdir()
    other = FileLock(d / "run.lock")  # as another `convscale train` holds it
    assert other.acquire()
    try:
        rc, _, err = cli(train(d))
        assert_user_error(rc, err, "another process")
        assert not (d / "config.json").exists()
    finally:
        other.release()
    assert cli(train(d))[0] == 0
    assert not is_locked(d / "run.lock")  # released when the run ends


@pytest.mark.slow
def test_two_real_trains_on_one_directory(tmp_path):
    from convscale.fslock import is_locked

    d = tmp_path / "run"
    cmd = convscale(*train(d, "--set", "log_every_steps=1", steps=400))
    first = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (d / "metrics.jsonl").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started; make it longer"
        assert_user_error(second.returncode, second.stderr, "being trained by another process")
    finally:
        first.send_signal(signal.SIGTERM)  # also: SIGTERM ends a run like Ctrl-C
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not is_locked(d / "run.lock")


# ---------------------------------------------------------------------------------------------
# 5. late failure: no held-out images is found at start


def test_shards_with_no_heldout_sample_fail_at_start(tmp_path, cli):
    _shard(tmp_path / "b.tar", 4)
    rc, _, err = cli(train(tmp_path / "run", "--data", "shards", "--data-path", tmp_path / "b.tar"))
    assert_user_error(rc, err, "held-out", "heldout_fraction")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing was trained


# ---------------------------------------------------------------------------------------------
# 6. (single items; the tables below cover the rest) SLURM without a node list


@pytest.mark.parametrize("environ", [
    # an srun step of 2 tasks (a batch script's variables alone make one process: test_distributed)
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"},
    {"SLURM_PROCID": "zero", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"},
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_NODELIST": "n1"},
])
def test_slurm_variables_without_a_node_list_are_a_user_error(environ):
    from convscale.errors import UserError
    from convscale.train.distributed import env_from_slurm

    with pytest.raises(UserError, match="SLURM"):
        env_from_slurm(dict(environ))


# ---------------------------------------------------------------------------------------------
# 8. smaller items


def test_summary_md_escapes_html_from_results_and_study():
    from convscale.report.content import Figure, Section, Table
    from convscale.report.markdown import render_markdown

    evil = "<script>alert(1)</script>"  # a model name, an error cell or a study name in a crafted table
    md = render_markdown(f"study {evil}", [Section(f"s {evil}", [
        Table(["model", "error"], [[evil, f"a | b {evil}"]]), f"paragraph {evil} & more",
        Figure("loss", f"caption {evil}")])])
    assert "<script" not in md.lower() and "<" not in md.replace("&lt;", "")
    assert md.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 6 and "a \\| b" in md and "&amp; more" in md


def test_study_out_keeps_an_existing_file(tmp_path, cli):
    out = tmp_path / "paper.toml"
    out.write_text("mine")
    rc, _, err = cli(["study", "paper", "--out", out])
    assert_user_error(rc, err, "--force")
    assert out.read_text() == "mine"
    assert cli(["study", "paper", "--out", out, "--force"])[0] == 0 and "F0" in out.read_text()


def test_steps_zero_is_named_as_such(tmp_path, cli):
    rc, _, err = cli(train(tmp_path / "r", steps=0))
    assert "batch" not in assert_user_error(rc, err, "--steps")


def test_a_log_row_that_spans_a_resume_equals_the_uninterrupted_one(tmp_path, cli, monkeypatch):
    import convscale.train.loop as loop

    common = ["--set", "log_every_steps=4", "--set", "checkpoint_every_steps=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(train(full, *common, steps=8))[0] == 0

    class Killed(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_die(run_dir, done, *a, **kw):  # killed right after the checkpoint at step 3
        real_save(run_dir, done, *a, **kw)
        raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        cli(train(cut, *common, steps=8))
    monkeypatch.undo()
    assert read_metrics(cut / "metrics.jsonl") == []  # no row yet: the first is due at step 4
    rc, _, err = cli(train(cut, *common, steps=8))
    assert rc == 0 and "resuming from step 3" in err
    key = lambda d: [(r["kind"], r["step"], r.get("loss"), r.get("heldout_loss")) for r in read_metrics(d / "metrics.jsonl")]
    assert key(cut) == key(full) and [r[1] for r in key(full)] == [4, 8, 8]


def test_models_at_a_resolution_some_models_cannot_take(cli):
    rc, out, err = cli(["models", "nfnet-f0", "vit-b16", "vit-h14", "--resolution", "256"])
    assert rc == 0, err
    assert "nfnet-f0" in out and "vit-b16" in out
    assert any(ln.startswith("vit-h14") and ln.split()[2] == "-" for ln in out.splitlines())
    assert "- vit-h14: resolution 256 px is not a multiple" in out
    rc, _, err = cli(["models", "vit-h14", "--resolution", "256"])
    assert_user_error(rc, err, "use 252 or 266")


# =============================================================================================
# The suite: every entry point against malformed values. Each case must end as a user error
# (exit 2, one line); the needle is a word the line must hold (the flag or field it names).

STUDY = """
name = "f"
[data]
kind = "procedural"
resolution = 16
num_classes = 4
heldout_images = 16
[train]
batch_size = 8
precision = "fp32"
threads = 1
checkpoint_every_seconds = 0
[[family]]
name = "vit"
models = ["vit-w8-d4-p4"]
optimizer = "adamw"
lrs = [0.004]
[budgets]
images = [16, 32]
"""

BAD_NUMBERS = {"nan": "nan", "inf": "inf", "-inf": "-inf", "neg": "-1", "zero": "0", "word": "x", "huge": "1e400"}


def _values(flag: str, kinds: str, needle: str | None = None) -> list:
    return [pytest.param(flag, BAD_NUMBERS[k], needle or flag, id=f"{flag}={k}") for k in kinds.split()]


TRAIN_VALUES = [
    *_values("--steps", "nan inf neg zero word huge"),
    *_values("--epochs", "nan inf -inf neg zero word huge"),
    *_values("--images", "nan neg zero word"),
    *_values("--train-flops", "nan inf neg zero word huge"),
    *_values("--lr", "nan inf neg zero word huge", "lr"),
    *_values("--weight-decay", "nan inf neg word", "weight_decay"),
    *_values("--batch-size", "nan neg zero word", "batch"),
    *_values("--grad-accum-steps", "neg zero word", "grad_accum_steps"),
    *_values("--ema-decay", "nan inf neg word", "ema_decay"),
    *_values("--label-smoothing", "nan inf neg word", "label_smoothing"),
    *_values("--resolution", "nan neg zero word", "resolution"),
    *_values("--num-classes", "neg zero word", "num_classes"),
    *_values("--threads", "neg word", "threads"),
    *_values("--eval-every-steps", "neg word", "eval_every_steps"),
    *_values("--checkpoint-every-steps", "neg word", "checkpoint_every_steps"),
    *_values("--seed", "nan word", "--seed"),
    pytest.param("--batch-size", "1000000000", "memory", id="--batch-size=huge"),
    pytest.param("--resolution", "1000000", "resolution", id="--resolution=huge"),
    pytest.param("--num-classes", "1000000000", "num_classes", id="--num-classes=huge"),
    pytest.param("--optimizer", "sgd", "optimizer", id="--optimizer=unknown"),
    pytest.param("--loss", "mse", "loss", id="--loss=unknown"),
    pytest.param("--precision", "fp8", "precision", id="--precision=unknown"),
    pytest.param("--model", "resnet-50", "resnet-50", id="--model=unknown"),
    pytest.param("--data", "imagenet", "imagenet", id="--data=unknown"),
    pytest.param("--set", "lr=nan", "lr", id="--set lr=nan"),
    pytest.param("--set", "data.resolution=sixteen", "data.resolution", id="--set data.resolution=word"),
    pytest.param("--set", "warmup_fraction=1.5", "warmup_fraction", id="--set warmup_fraction=huge"),
    pytest.param("--set", "momentum=-0.5", "momentum", id="--set momentum=neg"),
    pytest.param("--set", "log_every_steps=0", "log_every_steps", id="--set log_every_steps=zero"),
    pytest.param("--set", "data.heldout_fraction=1", "heldout_fraction", id="--set data.heldout_fraction=one"),
    pytest.param("--set", "data.workers=-2", "workers", id="--set data.workers=neg"),
    pytest.param("--set", "sam_rho=nan", "sam_rho", id="--set sam_rho=nan"),
    pytest.param("--set", "bogus=1", "bogus", id="--set unknown field"),
    pytest.param("--set", "lr", "KEY=VALUE", id="--set without ="),
]


@pytest.mark.parametrize("flag, value, needle", TRAIN_VALUES)
def test_train_bad_values(tmp_path, cli, monkeypatch, flag, value, needle):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in train(tmp_path / "run") if a != "--steps" and a != 2] if flag in (
        "--epochs", "--images", "--train-flops", "--steps") else train(tmp_path / "run")
    rc, _, err = cli([*argv, flag, value])
    assert_user_error(rc, err, needle)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Inputs for the other entry points: a study file, a results CSV, a synthetic sweep dir
    (no training) and one tiny finished run to fine-tune from."""
    from convscale.cli.main import main as run_main
    from support import make_sweep

    root = tmp_path_factory.mktemp("ctx")
    (root / "study.toml").write_text(STUDY)
    df = make_sweep(root / "sweep", budgets=np.logspace(12, 14, 3), curves=False)
    df.to_csv(root / "results.csv", index=False)
    assert run_main([str(a) for a in train(root / "pre")]) == 0
    return root


OTHER_VALUES = [
    # models
    ("models --resolution nan", "--resolution"), ("models --resolution -16", "--resolution"),
    ("models --resolution 0", "--resolution"), ("models --num-classes 0", "--num-classes"),
    ("models --num-classes x", "--num-classes"), ("models resnet-50", "resnet-50"),
    ("models --format xml", "--format"),
    # sweep plan / run / collect
    ("sweep plan {study} --no-probe --jobs 0", "--jobs"), ("sweep plan {study} --no-probe --jobs -1", "--jobs"),
    ("sweep plan {study} --no-probe --mfu nan", "--mfu"), ("sweep plan {study} --no-probe --mfu 0", "--mfu"),
    ("sweep plan {study} --no-probe --mfu 2", "--mfu"), ("sweep plan {study} --no-probe --mfu inf", "--mfu"),
    ("sweep plan {study} --probe-seconds nan", "--probe-seconds"),
    ("sweep plan {study} --probe-seconds -1", "--probe-seconds"),
    ("sweep plan {study} --probe-seconds 0", "--probe-seconds"),
    ("sweep plan {tmp}/missing.toml --no-probe", "not found"),
    ("sweep run {study} --dir {tmp}/s --jobs 0", "--jobs"), ("sweep run {study} --dir {tmp}/s --jobs -2", "--jobs"),
    ("sweep run {study} --dir {tmp}/s --executor slurm --time x", "--time"),
    ("sweep run {study} --dir {tmp}/s --executor slurm --time 0", "--time"),
    ("sweep run {study} --dir {tmp}/s --only nothing-matches", "--only"),
    ("sweep collect {tmp}/missing", "no sweep"),
    # fit
    ("fit {csv} --bootstrap -1", "--bootstrap"), ("fit {csv} --bootstrap x", "--bootstrap"),
    ("fit {tmp}/missing.csv", "does not exist"), ("fit {study}", "neither"),
    ("fit {csv} --out {tmp}/no/such/dir/fit.json", "does not exist"),
    # report / compare
    ("report {sweep} --mfu nan", "--mfu"), ("report {sweep} --mfu 0", "--mfu"), ("report {sweep} --mfu -1", "--mfu"),
    ("report {sweep} --bootstrap -1", "--bootstrap"), ("report {sweep} --target-loss nan", "--target-loss"),
    ("report {sweep} --target-loss -1", "--target-loss"), ("report {tmp}/missing", "missing"),
    ("compare {sweep} --target-loss nan", "--target-loss"), ("compare {sweep} --target-loss inf", "--target-loss"),
    ("compare {sweep} --target-loss 0", "--target-loss"), ("compare {sweep} --target-top1 nan", "--target-top1"),
    ("compare {sweep} --target-top1 2", "--target-top1"), ("compare {sweep} --bootstrap -1", "--bootstrap"),
    ("compare {tmp}/missing", "missing"),
    # finetune
    ("finetune --from {tmp}/missing --run-dir {tmp}/ft", "missing"),
    ("finetune --from {tmp}/sweep --run-dir {tmp}/ft", "sweep"),
    ("finetune --from {pre} --run-dir {tmp}/ft --epochs nan", "epochs"),
    ("finetune --from {pre} --run-dir {tmp}/ft --epochs -1", "epochs"),
    ("finetune --from {pre} --run-dir {tmp}/ft --steps 0", "--steps"),
    ("finetune --from {pre} --run-dir {tmp}/ft --lr nan", "lr"),
    ("finetune --from {pre} --run-dir {tmp}/ft --resolution 4", "resolution"),
    ("finetune --from {pre} --run-dir {tmp}/ft --drop-path-rate nan", "drop"),
    ("finetune --from {pre} --run-dir {tmp}/ft --dropout 2", "dropout"),
    ("finetune --from {pre} --run-dir {tmp}/ft --data arrays --data-path {tmp}/missing.npz", "missing.npz"),
    # study / demo
    ("study nope", "nope"), ("study paper --out {tmp}", "directory"),
    ("demo --jobs -1", "--jobs"), ("demo --bootstrap -1", "--bootstrap"), ("demo --scale huge", "--scale"),
]


@pytest.mark.parametrize("command, needle", OTHER_VALUES, ids=[c for c, _ in OTHER_VALUES])
def test_entry_point_bad_values(ctx, tmp_path, cli, monkeypatch, command, needle):
    monkeypatch.chdir(tmp_path)  # a check that fails to stop a command must not leave sweeps/ in the repo
    paths = {"study": ctx / "study.toml", "csv": ctx / "results.csv", "sweep": ctx / "sweep", "pre": ctx / "pre",
             "tmp": tmp_path}
    (tmp_path / "sweep").mkdir()
    argv = command.format(**paths).split()
    rc, _, err = cli(argv)
    assert_user_error(rc, err, needle.format(**paths))


# =============================================================================================
# Every input file kind truncated, corrupted and empty. What each gets ("error": one line, exit
# 2; "ok": the command succeeds, e.g. a torn metrics line is dropped and rewritten; "skipped": a
# damaged image is skipped and counted in result.json).

DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "corrupted": lambda b: b[: len(b) // 3] + bytes(random.Random(0).randrange(256) for _ in range(64)) + b[len(b) // 3 + 64:],
    "empty": lambda b: b"",
}


def _damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGE[how](path.read_bytes()))


def _finished_run(d: Path, cli) -> None:
    assert cli(train(d, "--set", "checkpoint_every_steps=1", steps=3))[0] == 0


def _kind_study(tmp, cli):
    (tmp / "s.toml").write_text(STUDY)
    return tmp / "s.toml", ["sweep", "plan", tmp / "s.toml", "--no-probe"], "error"


def _kind_train_config(tmp, cli):
    cfg = {"model": "vit-w8-d4-p4", "steps": 2, "batch_size": 8, "data": {"resolution": 16, "num_classes": 4}}
    (tmp / "c.json").write_text(json.dumps(cfg))
    return tmp / "c.json", ["train", "--config", tmp / "c.json", "--run-dir", tmp / "run"], "error"


def _run_file(name: str, drop_result: bool = False):
    def make(tmp, cli):
        _finished_run(tmp / "run", cli)
        if drop_result:  # a run killed after its final checkpoint: the next command reads it
            (tmp / "run" / "result.json").unlink()
        target = tmp / "run" / name
        if "*" in name:
            target = next((tmp / "run").glob(name))
        expect = "ok" if name == "metrics.jsonl" else "error"
        return target, train(tmp / "run", "--set", "checkpoint_every_steps=1", steps=3), expect
    return make


def _kind_npz(tmp, cli):
    rng = np.random.default_rng(0)
    np.savez(tmp / "a.npz", images=rng.integers(0, 255, (40, 12, 12, 3), dtype=np.uint8), labels=np.arange(40) % 4)
    return tmp / "a.npz", train(tmp / "run", "--data", "arrays", "--data-path", tmp / "a.npz",
                                "--set", "data.heldout_fraction=0.2"), "error"


def _kind_shard(tmp, cli):
    _shard(tmp / "b.tar", 20)
    return tmp / "b.tar", train(tmp / "run", "--data", "shards", "--data-path", tmp / "b.tar",
                                "--set", "data.heldout_fraction=0.3"), {"corrupted": "ok"}
    # the garbage lands in a member's zero padding, which no reader looks at; a corrupt member image
    # is skipped and counted (test_realdata.test_shards_corrupt_member_skipped_single_tar_and_glob)


def _kind_image(tmp, cli):
    root = _folder(tmp / "root", classes=2, per_class=5)
    return root / "c0" / "1.png", train(tmp / "run", "--data", "folder", "--data-path", root,
                                        "--set", "data.heldout_fraction=0.2", steps=3), "skipped"


def _kind_results_csv(tmp, cli):
    from support import make_sweep

    make_sweep(tmp / "sw", budgets=np.logspace(12, 14, 3), curves=False).to_csv(tmp / "r.csv", index=False)
    return tmp / "r.csv", ["fit", tmp / "r.csv", "--bootstrap", "0"], "error"


def _kind_results_parquet(tmp, cli):
    from support import make_sweep

    make_sweep(tmp / "sw", budgets=np.logspace(12, 14, 3), curves=False)
    return tmp / "sw" / "results.parquet", ["fit", tmp / "sw" / "results.parquet", "--bootstrap", "0"], "error"


def _sweep_file(name: str):
    def make(tmp, cli):
        (tmp / "s.toml").write_text(STUDY)
        assert cli(["sweep", "run", tmp / "s.toml", "--dir", tmp / "sw", "--dry-run"])[0] == 0
        return tmp / "sw" / name, ["sweep", "collect", tmp / "sw"], "error"
    return make


def _pretrained_file(name: str):
    def make(tmp, cli):
        _finished_run(tmp / "pre", cli)
        target = next((tmp / "pre").glob(name))
        return target, ["finetune", "--from", tmp / "pre", "--run-dir", tmp / "ft", "--steps", "1",
                        "--batch-size", "8", "--resolution", "16", "--quiet"], "error"
    return make


FILE_KINDS = {
    "study.toml": _kind_study,
    "train --config json": _kind_train_config,
    "run config.json": _run_file("config.json"),
    "run result.json": _run_file("result.json"),
    "run metrics.jsonl": _run_file("metrics.jsonl"),
    "checkpoint state.json": _run_file("checkpoints/step-*/state.json", drop_result=True),
    "checkpoint model.safetensors": _run_file("checkpoints/step-*/model.safetensors", drop_result=True),
    "checkpoint optimizer.safetensors": _run_file("checkpoints/step-*/optimizer.safetensors", drop_result=True),
    "arrays .npz": _kind_npz,
    "shard .tar": _kind_shard,
    "folder image": _kind_image,
    "results .csv": _kind_results_csv,
    "results .parquet": _kind_results_parquet,
    "sweep study.json": _sweep_file("study.json"),
    "sweep plan.json": _sweep_file("plan.json"),
    "pre-trained config.json": _pretrained_file("config.json"),
    "pre-trained result.json": _pretrained_file("result.json"),
    "pre-trained model.safetensors": _pretrained_file("checkpoints/step-*/model.safetensors"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_damaged_input_files(tmp_path, capsys, kind, how, cli):
    target, argv, expect = FILE_KINDS[kind](tmp_path, cli)
    expect = expect.get(how, "error") if isinstance(expect, dict) else expect
    capsys.readouterr()
    _damage(target, how)
    rc, out, err = cli(argv)
    if expect == "error":
        assert_user_error(rc, err)
    else:
        assert rc == 0 and "Traceback" not in err, err[-2000:]
        result = json.loads(out)
        assert result["status"] == "done"
        if expect == "skipped":
            assert result["skipped_images"] == 1


# =============================================================================================
# Run and sweep directories that are files, on a read-only file system, on a full disk.


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only); yields (path, remount(options))."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the read-only and full-disk cases are not run")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the read-only and full-disk cases are not run")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _sweep_argv(study: Path, root: Path) -> list:
    return ["sweep", "run", study, "--dir", root, "--dry-run"]


@pytest.mark.parametrize("command", ["train", "sweep run", "sweep collect", "report", "finetune"])
def test_directories_that_are_files(tmp_path, cli, command):
    f = tmp_path / "afile"
    f.write_text("x")
    (tmp_path / "s.toml").write_text(STUDY)
    argv = {"train": train(f), "sweep run": _sweep_argv(tmp_path / "s.toml", f), "sweep collect": ["sweep", "collect", f],
            "report": ["report", f], "finetune": ["finetune", "--from", f, "--run-dir", tmp_path / "ft"]}[command]
    rc, _, err = cli(argv)
    assert_user_error(rc, err)
    assert f.read_text() == "x"


def test_read_only_file_system(tmpfs, tmp_path, cli):
    mnt, remount = tmpfs
    (tmp_path / "s.toml").write_text(STUDY)
    assert cli(train(mnt / "done"))[0] == 0
    remount("ro")
    for argv in (train(mnt / "new"), _sweep_argv(tmp_path / "s.toml", mnt / "sweep"),
                 ["study", "paper", "--out", mnt / "p.toml"], ["fit", tmp_path / "none.csv", "--out", mnt / "f.json"]):
        rc, _, err = cli(argv)
        line = assert_user_error(rc, err)
        assert "read-only" in line.lower() or "does not exist" in line, line
    rc, _, err = cli(train(mnt / "done"))  # a finished run on a read-only disk: one line too
    assert_user_error(rc, err, "read-only")


def test_full_disk_keeps_the_run_and_it_resumes(tmpfs, tmp_path, cli):
    mnt, _ = tmpfs
    common = ["--set", "checkpoint_every_steps=2", "--set", "log_every_steps=1"]
    assert cli(train(tmp_path / "elsewhere", *common, steps=6))[0] == 0
    want = json.loads((tmp_path / "elsewhere" / "result.json").read_text())
    # room for the config and a row or two, not for a checkpoint
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, os.path.getsize(filler) - 24 * 1024)
    rc, _, err = cli(train(mnt / "run", *common, steps=6))
    assert_user_error(rc, err, "No space left", "rerun the same command")
    assert (mnt / "run" / "config.json").is_file()
    filler.unlink()
    rc, out, err = cli(train(mnt / "run", *common, steps=6))
    assert rc == 0, err
    got = json.loads(out)
    assert (got["heldout_loss"], got["steps"]) == (want["heldout_loss"], want["steps"])
    rows = lambda d: [(r["kind"], r["step"], r.get("loss")) for r in read_metrics(d / "metrics.jsonl")]
    assert rows(mnt / "run") == rows(tmp_path / "elsewhere")


# =============================================================================================
# A sweep killed at random moments, then rerun: every cell done exactly once, no orphan.

KILL_STUDY = STUDY.replace('lrs = [0.004]', 'lrs = [0.004, 0.002]').replace(
    "images = [16, 32]", "images = [400, 800]").replace(
    "checkpoint_every_seconds = 0", "checkpoint_every_seconds = 0\ncheckpoint_every_steps = 7\nlog_every_steps = 1")


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or open files name ``text`` (a process in exit has an empty
    command line but may hold its files, its locks among them, a moment longer)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace") or \
                        any(text in os.readlink(fd) for fd in (p / "fd").iterdir()):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _holders(path: Path) -> list[str]:
    """Who has ``path`` open: 'pid: cmdline' of each such process."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (p / "fd").iterdir()):
                found.append(f"{p.name}: {(p / 'cmdline').read_bytes().replace(bytes(1), b' ').decode()[:200]}")
        except OSError:
            pass
    return found


def _wait_no_orphans(root: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while _processes_mentioning(str(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_mentioning(str(root)), "a training process outlived its sweep"


def test_swallowed_sigterm_still_stops():
    """A library that swallows the interrupt (seen: an import during start-up, after which the
    sweep ran to the end and exited 0) does not cancel the stop: the next check raises again."""
    import threading

    from convscale import signals

    assert threading.current_thread() is threading.main_thread()
    old = signals.install()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, in the main thread
        except KeyboardInterrupt:
            pass  # what a careless library does
        assert signals.stop_requested()
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM kills
    finally:
        signal.signal(signal.SIGTERM, old)
        signals.reset()


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
def test_entry_exit_codes(tmp_path):
    """The process entry point ends by its own exit code, whatever the interpreter's shutdown does."""
    for argv, code in ((["--version"], 0), ([], 2), (["bogus"], 2), (["train", "--epochs", "nan"], 2)):
        done = subprocess.run(convscale(*argv), env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == code, (argv, done.returncode, done.stderr[-500:])
        assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children die with the sweep via PR_SET_PDEATHSIG (Linux)")
def test_sweep_kills(tmp_path):
    from convscale.sweep import SweepDir, collect

    study = tmp_path / "kill.toml"
    study.write_text(KILL_STUDY)
    root = tmp_path / "sweep"
    rng = random.Random(15)
    cmd = convscale("sweep", "run", study, "--dir", root, "--jobs", "2")
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(4.0, 10.0))  # startup, in a cell, between cells: wherever it is
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=90)
        if sig == signal.SIGTERM and proc.returncode not in (0, 130):
            pytest.fail(f"sweep ended {proc.returncode} on SIGTERM: {err[-2000:]}")
        assert "Traceback" not in err, err[-3000:]
        _wait_no_orphans(root)
        sweep = SweepDir(root)
        if sweep.exists():  # every lock released
            held = {c.cell_id: _holders(sweep.lock_path(c.cell_id)) for c in sweep.load()[1]
                    if sweep.state(c.cell_id) == "running"}
            assert not held, f"after {sig!r}: cells still locked, by {held}"
    final = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    _wait_no_orphans(root, 5)
    df = collect(root)
    assert len(df) == 4 and (df["status"] == "done").all()
    for cell in df.itertuples():
        rows = [r["step"] for r in read_metrics(Path(cell.run_dir) / "metrics.jsonl") if r["kind"] == "train"]
        assert rows == list(range(1, cell.steps + 1)), cell.cell_id  # each step once: resumed, never rerun
        log = (root / "logs" / f"{cell.cell_id}.err").read_text()
        assert log.count(": done after") == 1, cell.cell_id  # finished exactly once
