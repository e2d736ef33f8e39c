"""When a run has diverged, judged at each log row from the mean training loss since the last one.

Three ways, each a run that will not learn more at its learning rate:

- the loss is not finite;
- the loss rose above ``divergence_loss_factor`` x the first step's loss (0: off);
- the run *collapsed*: it learned (a log row >= LEARNED_FRACTION under the first-step loss) and then
  its loss came back to the first-step loss (within BACK_FRACTION, or above it) and stayed there
  for ``collapse_patience_fraction`` of the run's steps (at least COLLAPSE_MIN_ROWS log rows). A
  network that spikes and lands at chance loss (dead units: small NFNets at SGD lr 1.2 on the
  quick demo, trunk nfnet-w0.047 at step ~350 of 2243 on an avx512_bf16 Xeon) sits there for the
  rest of its budget otherwise, at full cost, and its results read as "learned nothing" when they
  are a learning rate past stability.

The running record (the lowest logged loss, the steps since the loss came back) lives in the
loop's checkpointed state, so a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any, Optional

LEARNED_FRACTION = 0.1  # a log row this far under the first-step loss: the run has learned (5 % fired on noise in short test runs)
BACK_FRACTION = 0.01  # a log row within this of the first-step loss (or above it): back at the start
COLLAPSE_MIN_ROWS = 10  # the patience is at least this many log rows

#: keys of the loop state this module keeps
MIN_KEY, BACK_KEY = "min_logged_loss", "steps_back_at_first_loss"


def patience_steps(fraction: float, total_steps: int, log_every_steps: int) -> int:
    """Steps a learned run may sit back at its first-step loss before it counts as collapsed."""
    return max(COLLAPSE_MIN_ROWS * log_every_steps, math.ceil(fraction * total_steps))


def check(state: dict[str, Any], mean_loss: float, steps_in_row: int, *, factor: float,
          collapse_patience_fraction: float, total_steps: int, log_every_steps: int) -> Optional[str]:
    """Record the log row's ``mean_loss`` (over ``steps_in_row`` steps) in ``state``; returns why the
    run diverged (a phrase), or None while it has not."""
    first = state.get("first_loss")
    if not math.isfinite(mean_loss):
        return f"loss {mean_loss:.4g}"
    if first is None or not math.isfinite(first) or first <= 0:
        return None
    if factor > 0 and mean_loss > factor * first:
        return f"loss {mean_loss:.4g}, over {factor:g}x the first-step loss {first:.4g}"
    low = min(float(state.get(MIN_KEY, math.inf)), mean_loss)
    state[MIN_KEY] = low
    learned = low <= (1 - LEARNED_FRACTION) * first
    back = learned and mean_loss >= (1 - BACK_FRACTION) * first
    state[BACK_KEY] = int(state.get(BACK_KEY, 0)) + steps_in_row if back else 0
    if collapse_patience_fraction > 0 and back:
        patience = patience_steps(collapse_patience_fraction, total_steps, log_every_steps)
        if state[BACK_KEY] >= patience:
            return (f"collapsed: it learned (loss down to {low:.4g}) and then sat at its first-step loss "
                    f"{first:.4g} for {state[BACK_KEY]} steps (loss {mean_loss:.4g})")
    return None
