"""Files a killed process never leaves half-written, JSON and JSON-lines I/O, and strict-JSON cleaning.

Every write goes to a temporary file in the target's directory (named ``TMP_PREFIX`` + name + random
part, so a run directory can tell a killed write's leftover from a foreign file), is fsynced, renamed
over the target with ``os.replace`` and the directory fsynced: a reader sees the old file or the
new one, never half of one. No torch here: the fitting and reporting stages use it too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

TMP_PREFIX = ".tmp-"

# the mode an ordinary open() would give (mkstemp makes 0600 files: a report must stay readable by others);
# read once, as os.umask can only be read by setting it
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` (e.g. ``lambda p: df.to_parquet(p)``, ``torch.save(obj, p)``) on a temporary
    file next to ``path``, then fsync it and rename it over ``path``. Returns ``path``.

    The parent directory is created if missing; on any error (or a kill) the target is untouched and
    the temporary file removed (a SIGKILL leaves it: it starts with ``TMP_PREFIX``). Its name does not
    end like the target's (a glob for ``*.json`` never sees it): give writers that guess the format
    from the name the format (``savefig(p, format="png")``), and ``np.save`` an open file, not the name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        write(Path(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = True, allow_nan: bool = True,
              ensure_ascii: bool = True) -> str:
    """``obj`` as JSON text ending in a newline (the layout every JSON file of ours has)."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, ensure_ascii=ensure_ascii) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, **layout: Any) -> Path:
    """Write ``obj`` as JSON atomically; ``layout``: ``json_text``'s keywords (default indent 2, sorted keys)."""
    return atomic_write_text(path, json_text(obj, **layout))


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None if it is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def jsonl_line(row: Any) -> str:
    """One JSON-lines row: strict JSON (non-finite floats as null, see ``json_clean``) and a newline."""
    return json.dumps(json_clean(row), allow_nan=False) + "\n"


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one row to a JSON-lines file (created if missing), flushed before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(row))


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every complete row of a JSON-lines file ([] when it is missing).

    A process killed mid-write leaves a torn last line (possibly cut inside a UTF-8 character):
    reading stops at the first line that does not parse, as nothing valid can follow it.
    """
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    rows = []
    for line in data.split(b"\n"):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
    return rows


def json_clean(obj: Any) -> Any:
    """``obj`` ready for strict JSON: non-finite floats (NaN, inf) become None, numpy scalars and
    arrays become Python numbers and lists, tuples become lists, dict keys become strings."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    # numpy without importing it: np.bool_, np.integer, np.floating and arrays all have .tolist()
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__ == "numpy":
        return json_clean(tolist())
    return obj
