"""One lock file per cell, held with flock while the cell runs, so no cell ever runs twice at once.

The lock descriptor is passed to the training subprocess too, so a cell whose sweep was killed
stays locked until its own run ends (and the run takes its run directory's own lock as well, so a
cell started by hand while a sweep runs it is refused). See convscale.fslock for the mechanism.
"""

from convscale.fslock import FileLock as CellLock
from convscale.fslock import is_locked

__all__ = ["CellLock", "is_locked"]
