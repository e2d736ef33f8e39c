"""The procedural stream: determinism, disjoint splits, balance, statistics, resume, workers, cache."""

import hashlib

import pytest
import torch

from convscale.data import build_source
from convscale.data.config import DataConfig
from convscale.data.ifs import ClassSystems, sincos
from convscale.data.procedural import ProceduralImages, ProceduralSource, materialize
from convscale.errors import UserError


@pytest.fixture(scope="module")
def gen16():
    return ProceduralImages(num_classes=100, resolution=16, seed=3)


def test_same_image_whatever_batch(gen16):
    whole, labels = gen16.render("train", torch.arange(0, 96))
    for lo, hi in [(0, 1), (5, 12), (40, 96), (17, 18)]:
        part, part_labels = gen16.render("train", torch.arange(lo, hi))
        assert torch.equal(part, whole[lo:hi]) and torch.equal(part_labels, labels[lo:hi])
    # shuffled order, and a fresh generator (empty class cache) give the same bits
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    again, _ = ProceduralImages(100, 16, 3).render("train", perm)
    assert torch.equal(again, whole[perm])


def test_seed_and_index_change_the_image(gen16):
    a, _ = gen16.render("train", torch.arange(8))
    b, _ = ProceduralImages(100, 16, 4).render("train", torch.arange(8))
    assert not torch.equal(a, b)
    assert all(not torch.equal(a[i], a[i + 1]) for i in range(7))


def test_heldout_never_equals_train():
    gen = ProceduralImages(num_classes=10, resolution=16, seed=0)
    digest = lambda x: {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}
    train = digest(gen.render_uint8("train", torch.arange(2000))[0])
    held = digest(gen.render_uint8("heldout", torch.arange(1024))[0])
    assert len(train) == 2000 and len(held) == 1024  # no duplicates inside a split either
    assert not train & held


def test_labels_balanced_and_in_range():
    gen = ProceduralImages(num_classes=1000, resolution=16, seed=1)
    labels = gen.labels("train", torch.arange(5000))
    assert labels.min() >= 0 and labels.max() < 1000
    assert torch.equal(torch.bincount(labels, minlength=1000), torch.full((1000,), 5))
    assert len(set(labels[:128].tolist())) == 128  # a batch holds distinct classes
    assert not torch.equal(labels[:1000], gen.labels("heldout", torch.arange(1000)))
    big = ProceduralImages(num_classes=30000, resolution=16, seed=1)
    x, y = big.render("train", torch.arange(29990, 30010))
    assert y.max() < 30000 and x.shape == (20, 3, 16, 16)


@pytest.mark.parametrize("res", [16, 32, 64, 224])
def test_resolutions_and_pixel_statistics(res):
    n = 64 if res < 224 else 8
    x, y = ProceduralImages(100, res, 0).render("train", torch.arange(n))
    assert x.shape == (n, 3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
    if res == 16:
        assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2
    # every image has a fractal foreground distinct from its background (thinner at high resolution)
    bg = x[:, :, 0, 0][:, :, None, None]
    fg_share = ((x - bg).abs().amax(1) > 0.05).float().mean((1, 2))
    assert fg_share.min() > (0.03 if res <= 32 else 0.01) and fg_share.max() < 0.8


def test_class_systems_pass_the_fill_test():
    systems = ClassSystems(64, seed=0)
    params, num_maps = systems.get(torch.arange(64))
    assert set(num_maps.tolist()) == {2, 3, 4}
    assert params[..., 2].min() >= 0.25 and params[..., 2].max() <= 0.85
    # classes are a function of (seed, class id) alone: asking for a subset gives the same system
    alone, _ = ClassSystems(64, seed=0).get(torch.tensor([37]))
    assert torch.equal(alone[0], params[37])


def test_sincos_polynomial():
    t = torch.linspace(-20, 20, 1001, dtype=torch.float64)
    s, c = sincos(t)
    assert torch.allclose(s, torch.sin(t), atol=1e-6) and torch.allclose(c, torch.cos(t), atol=1e-6)


def test_resume_equals_uninterrupted():
    src = ProceduralSource(DataConfig(num_classes=50, resolution=16, seed=2))
    it = src.train_batches(32)
    batches = [next(it) for _ in range(4)]
    x3, y3 = next(ProceduralSource(DataConfig(num_classes=50, resolution=16, seed=2)).train_batches(32, start_step=3))
    assert torch.equal(x3, batches[3][0]) and torch.equal(y3, batches[3][1])
    # batch k holds images k*b .. k*b+b-1 whatever the batch size
    x, _ = next(src.train_batches(64, start_step=1))
    assert torch.equal(x[:32], batches[2][0])


def test_workers_give_the_same_batches():
    cfg = DataConfig(num_classes=50, resolution=16, seed=5)
    ref = ProceduralSource(cfg).train_batches(16, start_step=2)
    par = ProceduralSource(cfg.replace(workers=2)).train_batches(16, start_step=2)
    for _ in range(5):
        (a, la), (b, lb) = next(ref), next(par)
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_cache_equals_generation_and_falls_back(tmp_path):
    cfg = DataConfig(num_classes=20, resolution=16, seed=7)
    materialize(cfg, 100, str(tmp_path / "c"))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["images.npy", "labels.npy", "meta.json"]
    cached = build_source(cfg.replace(path=str(tmp_path / "c")))
    fresh = ProceduralSource(cfg)
    for step in (0, 2, 3, 5):  # 96..128 straddles the cache end; 160.. is past it
        a, la = cached.train_batch(step, 32)
        b, lb = fresh.train_batch(step, 32)
        assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(UserError, match="seed"):
        ProceduralSource(cfg.replace(seed=8, path=str(tmp_path / "c")))
    with pytest.raises(UserError, match="materialize"):
        ProceduralSource(cfg.replace(path=str(tmp_path / "missing")))


def test_heldout_fixed_set():
    src = ProceduralSource(DataConfig(num_classes=10, resolution=16, heldout_images=70))
    batches = list(src.heldout_batches(32))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    again = list(src.heldout_batches(70))
    assert torch.equal(torch.cat([x for x, _ in batches]), again[0][0])
    assert src.num_train_images is None and src.skipped_images == 0 and src.num_classes == 10


def test_rank_parts_union_to_the_one_process_batch(tmp_path):
    """Each of 3 ranks renders only its share of every batch (10 = 4 + 3 + 3 images); together
    they are the 1-process batch, with workers, from a cache and past its end, and held out."""
    cfg = DataConfig(num_classes=20, resolution=16, seed=4, heldout_images=23)
    materialize(cfg, 25, str(tmp_path / "c"))
    for c in (cfg, cfg.replace(workers=2), cfg.replace(path=str(tmp_path / "c"))):
        whole = ProceduralSource(c).train_batches(10, start_step=1, uint8=True)
        parts = [ProceduralSource(c).train_batches(10, start_step=1, part=(r, 3), uint8=True) for r in range(3)]
        for _ in range(3):
            x, y = next(whole)
            shares = [next(p) for p in parts]
            assert [len(s[1]) for s in shares] == [4, 3, 3]
            assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)
    src = ProceduralSource(cfg)
    held = torch.cat([x for x, _ in src.heldout_batches(8)])
    shares = [list(src.heldout_batches(8, part=(r, 3))) for r in range(3)]
    assert [[len(y) for _, y in s] for s in shares] == [[3, 3, 3], [3, 3, 2], [2, 2, 2]]
    joined = torch.cat([torch.cat([s[i][0] for s in shares]) for i in range(3)])
    assert torch.equal(joined, held)
    x8, _ = next(src.train_batches(4, uint8=True))
    assert x8.dtype == torch.uint8 and torch.equal(src.normalize(x8), next(src.train_batches(4))[0])


def test_sync_free_hit_counts_equal_bincount():
    """The GPU path of the rasteriser (scatter-add into a buffer of known size, no host sync)
    counts exactly what bincount does."""
    from convscale.data.ifs import hit_counts

    flat = torch.randint(0, 500, (20_000,), generator=torch.Generator().manual_seed(0))
    a, b = hit_counts(flat, 512, sync_free=False), hit_counts(flat, 512, sync_free=True)
    assert a.sum() == 20_000 and a[500:].sum() == 0 and torch.equal(a, b.to(a.dtype))


def test_auto_workers():
    from convscale.data.config import resolve_workers

    cfg = DataConfig(kind="folder", path="x")
    assert cfg.workers == -1 and resolve_workers(cfg, "cpu") == 0  # CPU machines: the cores train
    assert resolve_workers(cfg, "cuda", local_processes=8, cpu_count=96) == 8
    assert resolve_workers(cfg, "cuda", local_processes=8, cpu_count=32) == 3  # 4 cores per rank, 1 trains
    assert resolve_workers(cfg.replace(workers=0), "cuda") == 0  # an explicit count is kept
    assert resolve_workers(DataConfig(device="cuda"), "cuda", cpu_count=96) == 0  # rendered on the GPU
