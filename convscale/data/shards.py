"""WebDataset-style tar shards, streamed: ``key.jpg`` (or .jpeg/.png/.webp/.bmp) + ``key.cls``.

Nothing is extracted and no shard is read whole: shards are walked header by header with the
``tarfile`` module (only the tiny ``.cls`` members are read), and a sample is carried as a
reference ``(shard, byte offset, size)`` whose bytes a worker reads with ``os.pread`` when it
builds the batch. Memory holds per-shard counts, never a list of all images.

Training order of epoch ``e``: shards in a permutation seeded by ``(seed, e)``, then a shuffle
buffer of ``shuffle_buffer`` references driven by a generator seeded by ``(seed, e)``. Starting at
step ``k`` replays that walk (headers only) and drops the first ``k * batch_size mod N``
references, so resumed runs see the same batches. Without ``heldout_path`` a sample is held out
when a seeded hash of its shard name and key falls below ``heldout_fraction``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from convscale.data.config import DataConfig
from convscale.data.loading import (
    IMAGE_EXTENSIONS,
    TAG_AUGMENT,
    TAG_BUFFER,
    TAG_SHARD_ORDER,
    BatchBuilder,
    BatchPlan,
    PlannedSource,
    Sample,
    check_class_ids,
    check_heldout_fraction,
    decode_image,
    rng_for,
)
from convscale.data.transforms import TransformSpec
from convscale.errors import UserError

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
DEFAULT_SHUFFLE_BUFFER = 2000
BLOCK = tarfile.BLOCKSIZE  # a tar ends with two zero blocks

#: (shard id, data offset in bytes, data size in bytes, name for messages)
ShardRef = tuple[int, int, int, str]


#: a brace group without nested braces: ``{000..099}`` (a range) or ``{a,b,c}`` (a list)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
#: more shard names than any dataset has; past it a typo in a range would list billions
MAX_SHARD_NAMES = 10_000_000
#: WebDataset's separator of several shard specs in one string
SPEC_SEPARATOR = "::"


def expand_braces(spec: str) -> list[str]:
    """Every name of a WebDataset-style shard spec, in the order written: ``{000..099}`` is a
    zero-padded range (the width of its first bound; ``{1..3}`` unpadded), ``{a,b}`` a list, and
    several groups multiply out left to right (``{a,b}-{0..1}`` -> a-0, a-1, b-0, b-1)."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    body, head, tail = m.group(1), spec[: m.start()], spec[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise UserError(f"shard range {{{body}}} in {spec!r} runs backwards; write {{{rng.group(2)}..{rng.group(1)}}}")
        if hi - lo + 1 > MAX_SHARD_NAMES:
            raise UserError(f"shard range {{{body}}} in {spec!r} names {hi - lo + 1:,} shards; check the bounds")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise UserError(f"{{{body}}} in shard spec {spec!r} is neither a range {{000..099}} nor a list {{a,b}}")
    tails = expand_braces(tail)
    return [head + item + t for item in items for t in tails]


def resolve_shards(path: str, what: str = "path") -> list[str]:
    """Shard files named by a .tar file, a folder of .tar files, a glob, or a WebDataset-style spec
    with brace ranges and lists (``train-{000000..000999}.tar``, ``{a,b}.tar``); several of these
    joined by ``::`` are read in turn. Files of a folder or glob are sorted; a spec's names come
    in the order written, and every one of them must exist. A shard named twice is read once."""
    if SPEC_SEPARATOR in path or _BRACE.search(path):
        out: list[str] = []
        for part in filter(None, path.split(SPEC_SEPARATOR)):
            names = expand_braces(part)
            if len(names) == 1 and not _BRACE.search(part):
                out.extend(resolve_shards(part, what))
                continue
            missing = [n for n in names if not os.path.isfile(os.path.expanduser(n))]
            if missing:
                raise UserError(f"data {what} {part} names {len(names)} shards, {len(missing)} of them missing "
                                f"(first: {missing[0]}); fix the range or write the shards")
            out.extend(str(Path(n).expanduser()) for n in names)
        if not out:
            raise UserError(f"data {what} {path!r} names no shard; give a .tar, a folder, a glob or a brace spec")
        return list(dict.fromkeys(out))
    p = Path(path).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(".tar"))
        if not found:
            raise UserError(
                f"data {what} {p} holds no .tar shards; "
                "write WebDataset-style key.jpg + key.cls tars there"
            )
        return found
    matched = sorted(f for f in glob.glob(str(p)) if os.path.isfile(f))
    if not matched:
        raise UserError(
            f"data {what} {path} matches no shard file; "
            "point it at a .tar, a folder of .tar files, a glob or a brace range like train-{000..099}.tar"
        )
    return matched


@dataclass(frozen=True)
class ShardSample:
    key: str
    offset: int
    size: int
    ext: str
    label: int


def iter_shard(path: str) -> Iterator[ShardSample]:
    """Complete samples (an image member and a ``.cls`` member) of one tar, in file order."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot open shard {path} ({e.strerror}); check the path and permissions") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError:
            raise UserError(f"{path} is not an uncompressed tar; write shards with tarfile mode 'w'") from None
        key: Optional[str] = None
        parts: dict[str, object] = {}
        while True:
            try:
                member = tf.next()
            except tarfile.TarError as e:
                raise UserError(f"shard {path} is damaged ({e}); re-write or remove it") from None
            # tarfile remembers every header it has read; forget them so huge shards stay small in memory
            tf.members = []
            if member is None:
                break
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            if not stem or stem.startswith("."):
                continue
            member_key = posixpath.join(folder, stem)
            if member_key != key:
                sample = _complete(key, parts)
                if sample is not None:
                    yield sample
                key, parts = member_key, {}
            ext = ext.lower()
            if ext in _IMAGE_EXTS:
                parts["image"] = (member.offset_data, member.size, ext)
            elif ext == "cls":
                parts["cls"] = _read_label(tf, member, path)
        sample = _complete(key, parts)
        if sample is not None:
            yield sample
        # tarfile ends quietly at a cut-off or garbled header; a whole tar has its end marker there
        f.seek(tf.offset)
        if f.read(BLOCK) != bytes(BLOCK):
            raise UserError(f"shard {path} is cut short or damaged at byte {tf.offset} of "
                            f"{os.fstat(f.fileno()).st_size} (no tar end marker after its last whole sample); "
                            "re-write it, or move it out of the data")


def _read_label(tf: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> int:
    handle = tf.extractfile(member)
    try:
        text = handle.read(64).decode("utf-8", "replace").strip() if handle is not None else ""
    except tarfile.TarError:
        raise UserError(f"shard {path} is cut short or damaged in {member.name}; "
                        "re-write it, or move it out of the data") from None
    try:
        label = int(text)
    except ValueError:
        raise UserError(
            f"{path}: {member.name} holds {text!r}, not an integer class id; "
            "write the label as text like '7'"
        ) from None
    if label < 0:
        raise UserError(f"{path}: {member.name} holds label {label}; class ids must be 0..num_classes-1")
    return label


def _complete(key: Optional[str], parts: dict) -> Optional[ShardSample]:
    if key is None or "image" not in parts or "cls" not in parts:
        return None
    offset, size, ext = parts["image"]
    return ShardSample(key, offset, size, ext, parts["cls"])


def heldout_score(seed: int, shard_name: str, key: str) -> float:
    """A seeded, process-independent uniform number in [0, 1) for a sample (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}/{shard_name}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class ShardReader:
    """Reads image bytes by offset with ``os.pread``: no shared file position, so forked workers
    may read the same shard safely; descriptors open lazily per process."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_fds": {}, "_pid": -1}

    def read(self, ref: ShardRef, draft_side_px: Optional[int]):
        shard, offset, size, _ = ref
        if self._pid != os.getpid():  # a fresh worker: descriptors of the parent are not ours
            self._fds, self._pid = {}, os.getpid()
        try:
            fd = self._fds.get(shard)
            if fd is None:
                fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            data = os.pread(fd, size, offset)
        except OSError:
            return None
        return decode_image(data, draft_side_px) if len(data) == size else None

    def describe(self, ref: ShardRef) -> str:
        return ref[3]


class ShardSource(PlannedSource):
    """Streamed tar shards; ``shuffle_buffer`` bounds the references held for shuffling."""

    def __init__(self, cfg: DataConfig, flip: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        super().__init__()
        if cfg.path is None:
            raise UserError(
                "data kind 'shards' needs a path; "
                "set data.path to a .tar, a folder of .tar files, a glob or a brace range like train-{000..099}.tar"
            )
        check_heldout_fraction(cfg.heldout_fraction)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.cfg, self.shuffle_buffer = cfg, shuffle_buffer
        self._train_ids = list(range(len(train := resolve_shards(cfg.path))))
        held = resolve_shards(cfg.heldout_path, "heldout_path") if cfg.heldout_path is not None else []
        self._held_ids = list(range(len(train), len(train) + len(held)))
        self._paths = train + held
        # one header walk at start: counts, classes, and a clear error for shards with nothing usable
        self.num_train_images = self.num_heldout_images = 0
        max_label = -1
        for shard in range(len(self._paths)):
            usable = 0
            for sample, is_train in self._walk_all(shard):
                usable += 1
                max_label = max(max_label, sample.label)
                if is_train:
                    self.num_train_images += 1
                else:
                    self.num_heldout_images += 1
            if usable == 0:
                raise UserError(
                    f"shard {self._paths[shard]} has no usable samples; "
                    "each needs key.jpg|png plus key.cls with an integer label"
                )
        if self.num_train_images == 0:
            raise UserError(f"no training samples in {cfg.path}; lower heldout_fraction or add shards")
        check_class_ids(max_label, self.num_train_images + self.num_heldout_images, f"shards {cfg.path}")
        self.num_classes = max_label + 1
        self._builder = BatchBuilder(ShardReader(self._paths), TransformSpec(cfg.resolution, flip=flip), cfg.strict)

    def _walk_all(self, shard: int) -> Iterator[tuple[ShardSample, bool]]:
        """Samples of a shard with whether they are training samples."""
        name = os.path.basename(self._paths[shard])
        is_heldout_shard = shard >= len(self._train_ids)
        split_by_hash = not is_heldout_shard and self.cfg.heldout_path is None and self.cfg.heldout_fraction > 0
        for sample in iter_shard(self._paths[shard]):
            if is_heldout_shard:
                yield sample, False
            elif split_by_hash:
                yield sample, heldout_score(self.cfg.seed, name, sample.key) >= self.cfg.heldout_fraction
            else:
                yield sample, True

    def _refs(self, shard: int, train: bool) -> Iterator[tuple[ShardRef, int]]:
        name = os.path.basename(self._paths[shard])
        for sample, is_train in self._walk_all(shard):
            if is_train == train:
                yield (shard, sample.offset, sample.size, f"{name}:{sample.key}.{sample.ext}"), sample.label

    def epoch_stream(self, epoch: int) -> Iterator[tuple[ShardRef, int]]:
        """Training (reference, label) pairs of one epoch in their shuffled order."""
        order = rng_for(self.cfg.seed, TAG_SHARD_ORDER, epoch).permutation(len(self._train_ids))
        rng = rng_for(self.cfg.seed, TAG_BUFFER, epoch)
        buffer: list[tuple[ShardRef, int]] = []
        for i in order:
            for item in self._refs(self._train_ids[i], train=True):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = int(rng.integers(self.shuffle_buffer))
                buffer[j], item = item, buffer[j]
                yield item
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def _train_plans(self, batch_size: int, start_step: int) -> Iterator[BatchPlan]:
        n = self.num_train_images
        epoch, skip = divmod(start_step * batch_size, n)
        samples: list[Sample] = []
        while True:
            for offset, (ref, label) in enumerate(self.epoch_stream(epoch)):
                if offset < skip:
                    continue
                samples.append(Sample(ref, label, (self.cfg.seed, TAG_AUGMENT, epoch, offset)))
                if len(samples) == batch_size:
                    yield BatchPlan(tuple(samples), train=True)
                    samples = []
            epoch, skip = epoch + 1, 0

    def _heldout_plans(self, batch_size: int) -> Iterator[BatchPlan]:
        shards = self._held_ids if self._held_ids else self._train_ids
        samples: list[Sample] = []
        for shard in shards:
            for ref, label in self._refs(shard, train=False):
                samples.append(Sample(ref, label, None))
                if len(samples) == batch_size:
                    yield BatchPlan(tuple(samples), train=False)
                    samples = []
        if samples:
            yield BatchPlan(tuple(samples), train=False)
