"""A run that learned and then collapsed back to its first-step loss stops as diverged: on the real
logged losses of the quick demo's collapsed trunk, and in the training loop (also across a kill)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from convscale.train import divergence
from convscale.train.checkpoint import list_checkpoints
from convscale.train.loop import run
from test_train import TinySource, tiny_cfg

# nfnet-w0.046875-d1.1.1's trunk at SGD lr 1.2 in `convscale demo` on an avx512_bf16 Xeon
# (2026-12-07): mean training loss of each 10-step log row, first-step loss 4.6056, 2804 schedule
# steps; it spiked to 6.10 at step 360 and sat at chance (ln 100 = 4.605) to its end at step 2243
DEMO_TRUNK_ROWS = [4.606, 4.605, 4.606, 4.605, 4.605, 4.605, 4.605, 4.604, 4.602, 4.6, 4.603, 4.597, 4.592, 4.566,
                   4.546, 4.52, 4.499, 4.45, 4.423, 4.396, 4.372, 4.377, 4.326, 4.339, 4.297, 4.281, 4.261, 4.214,
                   4.169, 4.161, 4.153, 4.16, 4.15, 4.098, 4.102, 6.103, 4.657, 4.609] + [4.606] * 186
FIRST = 4.6056


def _diverged_at(rows, state=None, start_step=0, fraction=0.05, total=2804, factor=3.0):
    state = {"first_loss": FIRST} if state is None else state
    for i, loss in enumerate(rows):
        why = divergence.check(state, loss, 10, factor=factor, collapse_patience_fraction=fraction,
                               total_steps=total, log_every_steps=10)
        if why is not None:
            return start_step + 10 * (i + 1), why
    return None, None


def test_the_demo_trunk_that_collapsed_stops_a_patience_after_its_spike():
    at, why = _diverged_at(DEMO_TRUNK_ROWS)
    # back at the first-step loss from the row of steps 351-360 on; patience ceil(0.05 * 2804) = 141
    # steps, so 15 rows: it stops at step 500 of the 2243 it trained, not at its end
    assert divergence.patience_steps(0.05, 2804, 10) == 141
    assert at == 350 + 150 and why.startswith("collapsed") and "4.098" in why
    assert _diverged_at(DEMO_TRUNK_ROWS, fraction=0.0) == (None, None)  # off: it trains to its end


def test_a_resumed_record_decides_at_the_same_step():
    state = {"first_loss": FIRST}
    assert _diverged_at(DEMO_TRUNK_ROWS[:40], state) == (None, None)
    state = json.loads(json.dumps(state))  # through a checkpoint's state.json
    assert _diverged_at(DEMO_TRUNK_ROWS[40:], state, start_step=400)[0] == 500


def test_runs_that_never_learned_or_recovered_from_a_spike_are_not_collapses():
    # the demo's largest NFNets sat at chance for whole small budgets: "learned nothing", not diverged
    assert _diverged_at([4.606, 4.605] * 100) == (None, None)
    # a spike back to the start for less than the patience, then learning again
    assert _diverged_at(DEMO_TRUNK_ROWS[:36] + [4.61] * 13 + [4.0] * 100) == (None, None)
    # the loss factor and non-finite losses still stop a run at once
    assert _diverged_at([4.0, 14.0])[0] == 20 and _diverged_at([4.0, math.nan])[0] == 20


class ShuffledAfter(TinySource):
    """Learnable until ``step``, then pure noise with random labels: the best a model can do is
    chance loss, so a run that learned goes back to its first-step loss, as a collapsed one does."""

    def __init__(self, step: int, **kw):
        super().__init__(**kw)
        self.step = step

    def train_batches(self, batch_size, start_step=0, *args, **kw):
        for k, (x, y) in enumerate(super().train_batches(batch_size, start_step, *args, **kw), start=start_step):
            if k >= self.step:
                x = x - self.patterns[y]
            yield x, y


def test_the_loop_stops_a_collapsed_run_as_diverged_and_a_resume_agrees(tmp_path):
    common = dict(steps=80, lr=0.2, precision="fp32", log_every_steps=2, collapse_patience_fraction=0.1)
    full = run(tiny_cfg(tmp_path, "full", **common), source=ShuffledAfter(24))
    assert full["status"] == "diverged" and 24 + 8 <= full["steps"] < 80 and full["heldout_loss"] is None
    assert json.loads((tmp_path / "full" / "result.json").read_text())["status"] == "diverged"
    # the result says why, for the sweep's log line
    assert full["diverged_reason"].startswith(f"at step {full['steps']} (collapsed: it learned")
    off = run(tiny_cfg(tmp_path, "off", **{**common, "collapse_patience_fraction": 0.0}), source=ShuffledAfter(24))
    assert off["status"] == "done" and off["steps"] == 80
    cfg = tiny_cfg(tmp_path, "killed", checkpoint_every_steps=4, **common)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, source=ShuffledAfter(24, fail_at_step=full["steps"] - 3))
    assert list_checkpoints(Path(cfg.run_dir))
    resumed = run(cfg, source=ShuffledAfter(24))
    assert (resumed["status"], resumed["steps"]) == ("diverged", full["steps"])
    assert resumed["diverged_reason"] == full["diverged_reason"]
