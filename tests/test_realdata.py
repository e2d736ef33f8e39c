"""Real-image sources: folders, tar shards, arrays, digits; transforms; corrupt-image handling."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convscale.data.arrays import ArraySource, DigitsSource
from convscale.data.config import DataConfig
from convscale.data.folder import FolderSource
from convscale.data.loading import rng_for, stratified_split
from convscale.data.shards import ShardSource, expand_braces, resolve_shards
from convscale.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformSpec,
    eval_transform,
    normalize_batch,
    sample_crop_box,
    train_transform,
)
from convscale.errors import UserError

# one pure colour per class, so every image in a batch shows which label it must carry
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
LO = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
HI = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)


def _encoded(colour, size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _make_folder(root: Path, per_class: int = 6, corrupt: bool = True) -> Path:
    for c, colour in enumerate(COLOURS):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            (d / f"img{i}.{ext}").write_bytes(_encoded(colour, fmt=fmt))
        (d / "notes.txt").write_text("not an image and not listed")
    if corrupt:
        (root / "class_0" / "truncated.jpg").write_bytes(_encoded(COLOURS[0], (64, 64), "JPEG")[:300])
        (root / "class_1" / "fake.jpg").write_bytes(b"this is a text file renamed to .jpg")
    return root


def _label_of(images: torch.Tensor) -> torch.Tensor:
    """The class whose colour channel is brightest (images are pure colours)."""
    return images.mean(dim=(2, 3)).argmax(dim=1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


# ---------------------------------------------------------------- transforms


def test_train_and_eval_transform_shapes_ranges_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    spec = TransformSpec(resolution=24)
    a = train_transform(img, spec, rng_for(0, 1))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    assert np.array_equal(a, train_transform(img, spec, rng_for(0, 1)))
    assert not np.array_equal(a, train_transform(img, spec, rng_for(0, 2)))
    e = eval_transform(img, spec)
    assert e.shape == (24, 24, 3) and np.array_equal(e, eval_transform(img, spec))
    assert spec.eval_resize_px == 27 and TransformSpec(224).eval_resize_px == 256
    # eval = resize shorter side to 27 (50x70 -> 27x38 by Pillow's own rounding) then centre crop
    expected = np.asarray(img.resize((38, 27), Image.Resampling.BICUBIC))[1:25, 7:31]
    assert np.array_equal(e, expected)
    x = normalize_batch([a, e])
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
    assert LO - 1e-4 <= x.min() and x.max() <= HI + 1e-4
    grey = normalize_batch([np.full((4, 4, 3), 128, np.uint8)])
    want = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(grey[0, :, 0, 0], want, atol=1e-6)


def test_crop_boxes_follow_inception_ranges():
    areas, ratios = [], []
    rng = rng_for(3)
    for _ in range(2000):
        l, t, r, b = sample_crop_box(200, 150, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= l < r <= 200 and 0 <= t < b <= 150
        areas.append((r - l) * (b - t) / (200 * 150))
        ratios.append((r - l) / (b - t))
    assert 0.075 <= min(areas) < 0.12 and max(areas) > 0.9
    assert min(ratios) > 0.73 and max(ratios) < 1.36
    # uniform in [0.08, 1] would average 0.54; boxes that do not fit a 4:3 frame are redrawn, pulling it down
    assert 0.40 < np.mean(areas) < 0.47


def test_flip_is_configurable():
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = 255  # bright left half
    img = Image.fromarray(half)
    full = dict(resolution=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def left_bright(spec, seed):
        out = train_transform(img, spec, rng_for(seed))
        return out[:, :8].mean() > out[:, -8:].mean()

    flipped = sum(not left_bright(TransformSpec(**full, flip=True), s) for s in range(200))
    assert 70 < flipped < 130
    assert all(left_bright(TransformSpec(**full, flip=False), s) for s in range(50))


def test_stratified_split_counts():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, held = stratified_split(labels, 0.2, seed=1)
    assert len(held) == 20 and len(train) == 80 and not set(train) & set(held)
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 6, 3, 1]
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=2)[1])
    # a class never loses its last training image
    _, held = stratified_split(np.array([0, 1, 1, 1]), 0.5, seed=0)
    assert 0 not in held.tolist() and len(held) == 2


# ---------------------------------------------------------------- folders


def test_folder_source_skips_and_counts_corrupt_images(tmp_path):
    root = _make_folder(tmp_path / "train")
    held = _make_folder(tmp_path / "held", per_class=2, corrupt=False)
    cfg = DataConfig(kind="folder", path=str(root), heldout_path=str(held), resolution=16, seed=5)
    src = FolderSource(cfg)
    assert src.classes == ["class_0", "class_1", "class_2"] and src.num_classes == 3
    assert src.num_train_images == 20 and src.num_heldout_images == 6  # 18 images + 2 corrupt; .txt ignored
    batches = _take(src.train_batches(5), 4)  # exactly one epoch: each file once
    assert src.skipped_images == 2
    assert sorted(Path(n).name for n in src.skipped_names) == ["fake.jpg", "truncated.jpg"]
    for x, y in batches:
        assert x.shape == (5, 3, 16, 16) and y.dtype == torch.int64
        assert torch.equal(_label_of(x), y)  # replacement images carry their own labels
    # 18 good images each seen once, plus 2 refills that repeat images of their own batch
    counts = torch.bincount(torch.cat([y for _, y in batches]), minlength=3)
    assert counts.sum() == 20 and counts.min() >= 6
    heldout = list(src.heldout_batches(4))
    assert [len(y) for _, y in heldout] == [4, 2]
    assert torch.equal(torch.cat([_label_of(x) for x, _ in heldout]), torch.cat([y for _, y in heldout]))
    again = list(src.heldout_batches(4))
    assert _same(heldout, again)


def test_folder_strict_raises_naming_the_file(tmp_path):
    root = _make_folder(tmp_path / "train")
    src = FolderSource(DataConfig(kind="folder", path=str(root), heldout_fraction=0.0, resolution=16, strict=True))
    with pytest.raises(UserError, match=r"(truncated|fake)\.jpg"):
        for _ in src.train_batches(5):
            pass


def test_folder_batches_are_deterministic_resumable_and_worker_independent(tmp_path):
    root = _make_folder(tmp_path / "train")
    cfg = DataConfig(kind="folder", path=str(root), heldout_fraction=0.2, resolution=16, seed=7)
    src = FolderSource(cfg)
    assert src.num_train_images == 16 and src.num_heldout_images == 4  # round(0.2 * 20), stratified
    run = _take(src.train_batches(6), 7)  # 42 positions: crosses two epoch boundaries
    assert _same(run, _take(FolderSource(cfg).train_batches(6), 7))
    assert _same(run[5:], _take(FolderSource(cfg).train_batches(6, start_step=5), 2))
    assert not torch.equal(run[0][0], _take(FolderSource(cfg.replace(seed=8)).train_batches(6), 1)[0][0])
    plans = [src.train_plan(k, 8) for k in range(4)]  # 32 positions = two epochs of 16
    epochs = [[s.ref for p in plans[:2] for s in p.samples], [s.ref for p in plans[2:] for s in p.samples]]
    assert set(epochs[0]) == set(epochs[1]) == set(src._train_refs) and epochs[0] != epochs[1]
    w0 = FolderSource(cfg)
    w2 = FolderSource(cfg.replace(workers=2))
    assert _same(_take(w0.train_batches(6), 4), _take(w2.train_batches(6), 4))
    assert w0.skipped_images == w2.skipped_images > 0
    assert _same(list(w0.heldout_batches(3)), list(w2.heldout_batches(3)))
    assert not set(src._heldout_refs) & set(src._train_refs)


def test_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FolderSource(DataConfig(kind="folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        FolderSource(DataConfig(kind="folder", path=str(tmp_path / "empty")))
    root = _make_folder(tmp_path / "data", corrupt=False)
    (root / "class_9").mkdir()
    (root / "class_9" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="class_9 has no images") as info:
        FolderSource(DataConfig(kind="folder", path=str(root)))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="needs a path"):
        FolderSource(DataConfig(kind="folder"))


# ---------------------------------------------------------------- shards


def _write_shard(path: Path, start: int, count: int, extra: dict[str, bytes] | None = None) -> None:
    with tarfile.open(path, "w") as tf:
        members = {}
        for i in range(start, start + count):
            c = i % 3
            members[f"s{i:04d}.{'jpg' if i % 2 else 'png'}"] = _encoded(COLOURS[c], fmt="JPEG" if i % 2 else "PNG")
            members[f"s{i:04d}.cls"] = str(c).encode()
        members.update(extra or {})
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def _shards(tmp_path: Path, corrupt: bool = False) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    extra = {"bad.jpg": b"\xff\xd8\xff not really a jpeg", "bad.cls": b"1"} if corrupt else None
    for s in range(3):
        _write_shard(d / f"part-{s:03d}.tar", 10 * s, 10, extra if s == 1 else None)
    (d / "README.md").write_text("ignored")
    return d


@pytest.mark.parametrize("draft_side_px", [None, 64, 20])
def test_simplejpeg_decodes_the_pixels_pil_decodes(monkeypatch, draft_side_px):
    from convscale.data import loading

    if loading.SIMPLEJPEG is None:
        pytest.skip("simplejpeg is not installed (a dependency: pip install simplejpeg)")
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 40, (150, 200, 3)).cumsum(axis=1) / 20, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    grey = io.BytesIO()
    Image.fromarray(photo[..., 0]).save(grey, format="JPEG", quality=90)
    real, calls = loading.SIMPLEJPEG, []

    class Counting:  # the fast path must really be taken, not fall back to PIL unseen
        @staticmethod
        def decode_jpeg(*a, **kw):
            calls.append(kw)
            return real.decode_jpeg(*a, **kw)

    for data in (buf.getvalue(), grey.getvalue()):
        monkeypatch.setattr(loading, "SIMPLEJPEG", Counting)
        fast = loading.decode_image(data, draft_side_px)
        assert len(calls) == 1 and calls.pop()["min_height"] == (draft_side_px or 0)
        monkeypatch.setattr(loading, "SIMPLEJPEG", None)
        plain = loading.decode_image(data, draft_side_px)
        monkeypatch.undo()
        assert fast.mode == plain.mode == "RGB" and fast.size == plain.size
        assert np.array_equal(np.asarray(fast), np.asarray(plain))
    if draft_side_px == 20:
        assert fast.size == (50, 38)  # 1/4 scale: the shorter side stays >= 20 px (1/8 would be 19)
    assert loading.decode_image(buf.getvalue()[:500]) is None  # cut short: PIL decides, as before


def test_brace_specs_expand_as_webdataset_writes_them():
    assert expand_braces("train-{000000..000002}.tar") == [f"train-00000{i}.tar" for i in range(3)]
    assert expand_braces("s{8..11}.tar") == ["s8.tar", "s9.tar", "s10.tar", "s11.tar"]  # unpadded bound
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert len(expand_braces("imagenet-train-{000000..001281}.tar")) == 1282
    with pytest.raises(UserError, match="runs backwards"):
        expand_braces("x-{5..1}.tar")
    with pytest.raises(UserError, match="neither a range"):
        expand_braces("x-{5}.tar")


def test_shard_paths_take_brace_ranges_lists_and_double_colon_joins(tmp_path):
    d = _shards(tmp_path)
    every = resolve_shards(str(d))
    assert resolve_shards(str(d / "part-{000..002}.tar")) == every
    assert resolve_shards(str(d / "part-{002,000}.tar")) == [every[2], every[0]]  # in the order written
    joined = f"{d / 'part-001.tar'}::{d / 'part-{000..002}.tar'}"
    assert resolve_shards(joined) == [every[1], every[0], every[2]]  # a shard named twice is read once
    assert resolve_shards(f"{d / 'part-000.tar'}::{d}/part-00[12].tar") == every  # a glob after ::
    with pytest.raises(UserError, match=r"names 5 shards, 2 of them missing \(first: .*part-003.tar\)"):
        resolve_shards(str(d / "part-{000..004}.tar"))
    src = ShardSource(DataConfig(kind="shards", path=str(d / "part-{000..002}.tar"), heldout_fraction=0.25,
                                 resolution=16, seed=3), shuffle_buffer=4)
    same = ShardSource(DataConfig(kind="shards", path=str(d), heldout_fraction=0.25, resolution=16, seed=3),
                       shuffle_buffer=4)
    assert [r for r, _ in src.epoch_stream(0)] == [r for r, _ in same.epoch_stream(0)]


def test_shards_stream_each_epoch_once_and_resume(tmp_path):
    d = _shards(tmp_path)
    cfg = DataConfig(kind="shards", path=str(d), heldout_fraction=0.25, resolution=16, seed=3)
    src = ShardSource(cfg, shuffle_buffer=4)
    assert src.num_classes == 3 and src.num_train_images + src.num_heldout_images == 30
    assert 0 < src.num_heldout_images < 15
    e0 = [ref for ref, _ in src.epoch_stream(0)]
    e1 = [ref for ref, _ in src.epoch_stream(1)]
    assert len(e0) == len(set(e0)) == src.num_train_images and set(e0) == set(e1) and e0 != e1
    held = [y for _, y in src.heldout_batches(4)]
    assert sum(len(y) for y in held) == src.num_heldout_images
    held_names = {ref[3] for s in range(3) for ref, _ in src._refs(s, train=False)}
    assert not held_names & {ref[3] for ref in e0}
    run = _take(src.train_batches(7), 8)  # 56 positions > 2 epochs
    for x, y in run:
        assert x.shape == (7, 3, 16, 16) and torch.equal(_label_of(x), y)
    assert _same(run, _take(ShardSource(cfg, shuffle_buffer=4).train_batches(7), 8))
    assert _same(run[6:], _take(ShardSource(cfg, shuffle_buffer=4).train_batches(7, start_step=6), 2))
    w2 = ShardSource(cfg.replace(workers=2), shuffle_buffer=4)
    assert _same(run[:4], _take(w2.train_batches(7), 4))


def test_shards_corrupt_member_skipped_single_tar_and_glob(tmp_path):
    d = _shards(tmp_path, corrupt=True)
    cfg = DataConfig(kind="shards", path=str(d / "part-001.tar"), heldout_fraction=0.0, resolution=16)
    src = ShardSource(cfg)
    assert src.num_train_images == 11
    batches = _take(src.train_batches(11), 2)  # two epochs: the bad member is drawn twice, counted once
    assert src.skipped_images == 1 and src.skipped_names == ["part-001.tar:bad.jpg"]
    assert all(torch.equal(_label_of(x), y) for x, y in batches)
    with pytest.raises(UserError, match="bad.jpg"):
        next(ShardSource(cfg.replace(strict=True)).train_batches(11))
    glob_cfg = DataConfig(kind="shards", path=str(d / "part-00[02].tar"), heldout_path=str(d / "part-001.tar"))
    both = ShardSource(glob_cfg)
    assert (both.num_train_images, both.num_heldout_images) == (20, 11)
    assert sum(len(y) for _, y in both.heldout_batches(8)) == 10 and both.skipped_images == 1


def test_shard_errors(tmp_path):
    with pytest.raises(UserError, match="matches no shard"):
        ShardSource(DataConfig(kind="shards", path=str(tmp_path / "missing-*.tar")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards"):
        ShardSource(DataConfig(kind="shards", path=str(tmp_path / "empty")))
    _write_shard(tmp_path / "nolabels.tar", 0, 0, {"a.jpg": _encoded(COLOURS[0], fmt="JPEG"), "b.txt": b"hi"})
    with pytest.raises(UserError, match="nolabels.tar has no usable samples"):
        ShardSource(DataConfig(kind="shards", path=str(tmp_path / "nolabels.tar")))
    _write_shard(tmp_path / "badcls.tar", 0, 2, {"z.png": _encoded(COLOURS[0]), "z.cls": b"cat"})
    with pytest.raises(UserError, match="not an integer class id"):
        ShardSource(DataConfig(kind="shards", path=str(tmp_path / "badcls.tar")))
    (tmp_path / "plain.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="not an uncompressed tar"):
        ShardSource(DataConfig(kind="shards", path=str(tmp_path / "plain.tar")))


# ---------------------------------------------------------------- arrays and digits


def test_array_source_greyscale_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    images = (labels[:, None, None] * 60 + rng.integers(0, 20, (40, 12, 12))).astype(np.uint8)
    np.savez(tmp_path / "grey.npz", images=images, labels=labels)
    cfg = DataConfig(kind="arrays", path=str(tmp_path / "grey.npz"), heldout_fraction=0.25, resolution=16)
    src = ArraySource(cfg)
    assert (src.num_classes, src.num_train_images, src.num_heldout_images) == (4, 30, 10)
    assert src.spec.crop_scale == (0.35, 1.0)  # 12 px images get the milder crop range
    x, y = next(src.train_batches(8))
    assert x.shape == (8, 3, 16, 16)
    assert _same(_take(src.train_batches(8), 5)[3:], _take(ArraySource(cfg).train_batches(8, start_step=3), 2))
    np.savez(tmp_path / "nolabels.npz", images=images)
    with pytest.raises(UserError, match="lacks 'labels'"):
        ArraySource(cfg.replace(path=str(tmp_path / "nolabels.npz")))
    np.savez(tmp_path / "neg.npz", images=images, labels=labels - 1)
    with pytest.raises(UserError, match="out of range"):
        ArraySource(cfg.replace(path=str(tmp_path / "neg.npz")))
    np.savez(tmp_path / "held.npz", images=images[:5], labels=labels[:5] + 4)
    with pytest.raises(UserError, match="held-out labels out of range"):
        ArraySource(cfg.replace(heldout_path=str(tmp_path / "held.npz")))
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=labels)
    with pytest.raises(UserError, match="uint8"):
        ArraySource(cfg.replace(path=str(tmp_path / "float.npz")))
    with pytest.raises(UserError, match="does not exist"):
        ArraySource(cfg.replace(path=str(tmp_path / "nope.npz")))


def test_digits_source_split_and_batches():
    cfg = DataConfig(kind="digits", heldout_fraction=0.2, resolution=16, seed=0)
    src = DigitsSource(cfg)
    assert src.num_classes == 10 and src.spec.flip is False
    assert (src.num_train_images, src.num_heldout_images) == (1438, 359)  # 1797 = 1438 + round(0.2 * 1797)
    train_ids = {i for _, i in src._train_refs}
    held_ids = {i for _, i in src._heldout_refs}
    assert not train_ids & held_ids and len(train_ids | held_ids) == 1797
    held_counts = np.bincount(src._heldout_labels, minlength=10)
    assert held_counts.min() >= 35 and held_counts.max() <= 37  # stratified: ~20 % of each ~180-image class
    assert held_ids == {i for _, i in DigitsSource(cfg)._heldout_refs}
    assert held_ids != {i for _, i in DigitsSource(cfg.replace(seed=1))._heldout_refs}
    x, y = next(src.train_batches(64))
    assert x.shape == (64, 3, 16, 16) and 0 <= y.min() and y.max() <= 9
    grey = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)
    hx, hy = next(src.heldout_batches(512))
    assert hx.shape == (359, 3, 16, 16) and torch.equal(hy, torch.as_tensor(src._heldout_labels))
    with pytest.raises(UserError, match="unset heldout_path"):
        DigitsSource(cfg.replace(heldout_path="/tmp/x.npz"))


# ---------------------------------------------------------------- data-parallel parts, uint8


def _parts_union(make_source, batch: int, steps: int, world: int, **kw):
    """Each of ``world`` fresh sources builds only its part; their concatenation per step."""
    shares = [_take(make_source().train_batches(batch, part=(r, world), **kw), steps) for r in range(world)]
    return [(torch.cat([s[k][0] for s in shares]), torch.cat([s[k][1] for s in shares])) for k in range(steps)]


def test_rank_parts_union_to_the_one_process_batch(tmp_path):
    """Every rank decodes only its share (3 ranks, batches of 7: shares 3, 2, 2), and the shares
    together are the 1-process batch, bit for bit: folder, shards, arrays, with workers too."""
    root = _make_folder(tmp_path / "train", corrupt=False)
    folder = DataConfig(kind="folder", path=str(root), heldout_fraction=0.2, resolution=16, seed=7)
    shards = DataConfig(kind="shards", path=str(_shards(tmp_path)), heldout_fraction=0.25, resolution=16, seed=3)
    arrays = tmp_path / "a.npz"
    rng = np.random.default_rng(0)
    np.savez(arrays, images=rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8), labels=np.arange(30) % 3)
    for make in (lambda: FolderSource(folder), lambda: FolderSource(folder.replace(workers=2)),
                 lambda: ShardSource(shards, shuffle_buffer=4),
                 lambda: ArraySource(DataConfig(kind="arrays", path=str(arrays), resolution=16, seed=1))):
        whole = _take(make().train_batches(7), 5)
        parts = _parts_union(make, 7, 5, 3)
        assert _same(whole, parts)
        assert [len(y) for _, y in _take(make().train_batches(7, part=(0, 3)), 1)] == [3]
        held = torch.cat([x for x, _ in make().heldout_batches(4)])
        r0, r1 = (list(make().heldout_batches(4, part=(r, 2))) for r in range(2))
        # one item per batch on both ranks, even where rank 1's share (of a last 1-image batch) is empty
        assert len(r0) == len(r1) and all(x.shape[1:] == (3, 16, 16) for x, _ in r1)
        joined = [torch.cat([a[0], b[0]]) for a, b in zip(r0, r1)]
        assert torch.equal(torch.cat(joined), held)


def test_uint8_batches_normalise_to_the_float_ones(tmp_path):
    root = _make_folder(tmp_path / "train", corrupt=False)
    src = FolderSource(DataConfig(kind="folder", path=str(root), heldout_fraction=0.2, resolution=16, seed=7))
    (x8, y8), = _take(src.train_batches(6, uint8=True), 1)
    (xf, yf), = _take(FolderSource(src.cfg).train_batches(6), 1)
    assert x8.dtype == torch.uint8 and x8.shape == (6, 3, 16, 16) and x8.element_size() * 4 == xf.element_size()
    assert torch.equal(src.normalize(x8), xf) and torch.equal(y8, yf)
