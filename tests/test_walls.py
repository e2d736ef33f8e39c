"""The walls between stages: models -> data -> train -> sweep -> scaling -> report, cli on top.

Every module of a stage is imported on its own (a fresh forked interpreter each) and what it pulled
in is read from ``sys.modules``: a stage loads no stage to its right; the fitting and reporting
stages load neither torch nor the trainer (a user fits and reports runs that came from anywhere);
the shared modules at the package root load no stage at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "convscale"
#: each probe forks and imports a whole stage: ~6-25 s per test on a loaded 2-core machine
pytestmark = pytest.mark.slow

STAGES = ("models", "data", "train", "sweep", "scaling", "report", "cli")
TORCH_FREE = {"scaling", "report"}

# imports each named module in a forked child of a bare interpreter; prints what each one loaded
PROBE = r"""
import importlib, json, os, sys
found = {}
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "convscale"))
        os.write(w, json.dumps(loaded).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    _, status = os.waitpid(pid, 0)
    found[name] = json.loads(data) if status == 0 and data else None
print(json.dumps(found))
"""


def modules(stage: str | None) -> list[str]:
    """Dotted names of a stage's modules; ``None``: the shared modules at the package root."""
    if stage is None:
        return sorted(f"convscale.{p.stem}" for p in PACKAGE.glob("*.py")
                      if p.stem not in ("__init__", "__main__"))
    names = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def loaded_by(names: list[str]) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PROBE, *names], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    failed = [n for n, v in found.items() if v is None]
    assert not failed, f"these modules fail to import on their own: {failed}"
    return found


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
@pytest.mark.parametrize("stage", [*STAGES[:-1], None], ids=[*STAGES[:-1], "shared"])
def test_stage_walls(stage):
    names = modules(stage)
    assert names, f"no modules found for {stage}"
    right = set(STAGES) if stage is None else set(STAGES[STAGES.index(stage) + 1:])
    breaches = {}
    for name, loaded in loaded_by(names).items():
        bad = sorted({s for s in map(stage_of, loaded) if s in right})
        if stage is None or stage in TORCH_FREE:
            bad += [m for m in ("torch",) if m in loaded]
        if stage in TORCH_FREE:
            bad += sorted({s for s in map(stage_of, loaded) if s == "train"})
        if bad:
            breaches[name] = bad
    assert not breaches, f"imports across a wall (module: what it loaded): {breaches}"


def test_walls_probe_sees_a_breach(tmp_path):
    """The probe is not blind: a module that imports torch is reported as loading it."""
    pkg = tmp_path / "wallcheck"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("import convscale.train.loop\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, "wallcheck.heavy", "convscale.errors"], env=env,
                          capture_output=True, text=True, timeout=600)
    found = json.loads(done.stdout)
    assert "torch" in found["wallcheck.heavy"] and "convscale.train.loop" in found["wallcheck.heavy"]
    assert "torch" not in found["convscale.errors"]
