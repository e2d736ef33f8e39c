"""ViT family: published parameter counts and FLOPs, flop-counter agreement, pooling, position embeddings, names."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from convscale.errors import UserError
from convscale.models.base import config_from_dict, config_to_dict
from convscale.models.vit import (
    VARIANTS,
    ViTConfig,
    default_num_heads,
    load_pretrained,
    parse_name,
)
from convscale.models.vit_posemb import posemb_sincos_2d, resample_pos_embed

TINY = VARIANTS["vit-tiny"]


def meta_params(cfg: ViTConfig, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Parameter count on the meta device: nothing allocated, fine for ViT-G."""
    with torch.device("meta"):
        model = cfg.build()
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(exclude_prefixes))


def counted_flops(cfg: ViTConfig, resolution: int, device: str, batch: int = 2) -> float:
    """torch.utils.flop_counter FLOPs per image.

    The counter has no formula for the CPU fused SDPA kernel (it would count attention as 0), so
    attention is made visible rather than added by hand: on the meta device SDPA decomposes into
    the math path (two bmm), and on CPU we force SDPBackend.MATH. Nothing is added analytically.
    """
    with torch.device(device):
        model = cfg.build()
        images = torch.randn(batch, 3, resolution, resolution)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / batch


def trainable(cfg: ViTConfig, seed: int = 0) -> torch.nn.Module:
    """A small model with a non-zero classifier, so gradients reach the body on the first step."""
    torch.manual_seed(seed)
    model = cfg.build()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    return model


# --------------------------------------------------------------------------- published numbers

def test_param_counts_match_timm_and_papers() -> None:
    # timm vit_base_patch16_224 / vit_large_patch16_224 (1000 classes), exact.
    assert meta_params(VARIANTS["vit-b16"]) == 86_567_656
    assert meta_params(VARIANTS["vit-l16"]) == 304_326_632
    assert meta_params(VARIANTS["vit-h14"]) == pytest.approx(632e6, rel=1e-3)  # NFNet paper Table 5: 632M
    # Zhai et al. Table 2 counts the encoder only (their JFT head differs): ours minus MAP head and classifier.
    g_total, gg_total = meta_params(VARIANTS["vit-g14"]), meta_params(VARIANTS["vit-gg14"])
    g_body = meta_params(VARIANTS["vit-g14"], exclude_prefixes=("head.", "classifier."))
    gg_body = meta_params(VARIANTS["vit-gg14"], exclude_prefixes=("head.", "classifier."))
    print(f"ViT-g/14 {g_total / 1e6:.1f}M total, {g_body / 1e6:.1f}M encoder; "
          f"ViT-G/14 {gg_total / 1e6:.1f}M total, {gg_body / 1e6:.1f}M encoder")
    assert g_body == pytest.approx(1011e6, rel=2e-3)
    assert gg_body == pytest.approx(1843e6, rel=2e-3)
    assert g_total > g_body + 25e6  # MAP head (~25.2M) + 1000-way classifier are on top


@pytest.mark.parametrize(
    "name, resolution, published_gflops",
    [  # Zhai et al. Table 2, "GFLOPs" = 2 x MACs; timm cards give 17.6 (B/16) and 167.4 (H/14) GMACs.
        ("vit-b16", 224, 35.1),
        ("vit-b16", 384, 111.3),
        ("vit-l16", 224, 122.9),
        ("vit-l16", 384, 382.8),
        ("vit-g14", 224, 533.1),
        ("vit-gg14", 224, 965.3),
        ("vit-h14", 224, 2 * 167.4),
    ],
)
def test_analytic_flops_match_published(name: str, resolution: int, published_gflops: float) -> None:
    assert VARIANTS[name].forward_flops(resolution) / 1e9 == pytest.approx(published_gflops, rel=0.01)


def test_b16_is_17_6_gmacs() -> None:
    assert VARIANTS["vit-b16"].forward_flops(224) / 2 / 1e9 == pytest.approx(17.6, rel=0.01)


@pytest.mark.parametrize(
    "cfg, resolution",
    [
        (VARIANTS["vit-b16"], 224),
        (VARIANTS["vit-b16"], 384),  # runs with a resampled learned position grid
        (VARIANTS["vit-g14"], 224),  # MAP head
        (dataclasses.replace(VARIANTS["vit-s16"], pool="gap", posemb="sincos2d"), 160),
    ],
)
def test_analytic_flops_match_flop_counter_on_meta(cfg: ViTConfig, resolution: int) -> None:
    assert cfg.forward_flops(resolution) == pytest.approx(counted_flops(cfg, resolution, "meta"), rel=0.01)


@pytest.mark.parametrize("pool", ["token", "gap", "map"])
def test_analytic_flops_match_flop_counter_on_cpu(pool: str) -> None:
    cfg = dataclasses.replace(TINY, pool=pool, num_classes=10)
    counted = counted_flops(cfg, 16, "cpu")
    assert cfg.forward_flops(16) == pytest.approx(counted, rel=0.01)
    attention_macs = 2 * cfg.depth * (16 + cfg.num_prefix_tokens) ** 2 * cfg.width
    assert counted > cfg.forward_flops(16) - 2 * attention_macs  # attention really was counted


def test_flops_scale_with_tokens() -> None:
    b16 = VARIANTS["vit-b16"]
    # 4x the tokens: linears scale 4x, attention 16x, so a little over 4x.
    assert 4.0 < b16.forward_flops(448) / b16.forward_flops(224) < 4.6


# --------------------------------------------------------------------------- model behaviour

@pytest.mark.parametrize("pool", ["token", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_forward_backward_tiny(pool: str, posemb: str) -> None:
    cfg = dataclasses.replace(TINY, pool=pool, posemb=posemb, num_classes=7, dropout=0.1, drop_path_rate=0.1)
    model = trainable(cfg)
    images = torch.randn(4, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    model.eval()
    assert torch.equal(model(images), model(images))  # dropout and drop-path off in eval


def test_zero_initialised_classifier_gives_uniform_predictions() -> None:
    model = dataclasses.replace(TINY, num_classes=10).build()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(3, 3, 16, 16)), torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(math.log(10), abs=1e-6)
    assert isinstance(model.classifier, torch.nn.Linear)


def test_pools_differ_in_parameters() -> None:
    token = meta_params(TINY)
    gap = meta_params(dataclasses.replace(TINY, pool="gap"))
    mapp = meta_params(dataclasses.replace(TINY, pool="map"))
    w, m = TINY.width, TINY.mlp_dim
    assert token - gap == 2 * w  # class token + its position embedding
    # probe + q, kv, out projections + LayerNorm + MLP, and no class token.
    assert mapp - gap == w + (4 * w * w + 4 * w) + 2 * w + (2 * w * m + m + w)


def test_sincos_has_no_position_parameters() -> None:
    cfg = dataclasses.replace(TINY, posemb="sincos2d")
    grid = 16 // 4
    assert meta_params(TINY) - meta_params(cfg) == (1 + grid * grid) * TINY.width
    assert not any("pos_embed" in k for k in cfg.build().state_dict())


def test_sincos_values_pinned_against_formula() -> None:
    pe = posemb_sincos_2d((2, 3), 8)
    assert pe.shape == (1, 6, 8)
    # Token 5 is row y=1, column x=2; width 8 gives frequencies w = [1, 1/10000].
    x, y = 2.0, 1.0
    expected = [math.sin(x), math.sin(x * 1e-4), math.cos(x), math.cos(x * 1e-4),
                math.sin(y), math.sin(y * 1e-4), math.cos(y), math.cos(y * 1e-4)]
    assert pe[0, 5].tolist() == pytest.approx(expected, abs=1e-7)
    big = posemb_sincos_2d((4, 4), 768)
    assert big[0, 0, :192].abs().max() == 0.0 and big[0, 0, 192:384].min() == 1.0  # sin 0 and cos 0


def test_resample_same_grid_is_identity_and_keeps_class_token() -> None:
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(pe, (4, 4), 1), pe)
    up = resample_pos_embed(pe, (8, 6), 1)
    assert up.shape == (1, 1 + 48, 8)
    assert torch.equal(up[:, 0], pe[:, 0])
    const = torch.ones(1, 9, 4).mul_(3.0)  # a constant grid stays constant under either interpolation
    for mode in ("bicubic", "bilinear"):
        assert torch.allclose(resample_pos_embed(const, (5, 5), 0, mode=mode), torch.full((1, 25, 4), 3.0))
    with pytest.raises(ValueError):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4), 1)


def test_checkpoint_loads_across_image_sizes() -> None:
    small = trainable(TINY)  # image_size 16: 4 x 4 grid
    big_cfg = dataclasses.replace(TINY, image_size=32)
    big = big_cfg.build()
    big.load_state_dict(small.state_dict())  # resampled by the load hook
    assert big.pos_embed.shape == (1, 1 + 64, TINY.width)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])
    images = torch.randn(2, 3, 32, 32)
    small.eval(), big.eval()
    out = big(images)
    assert torch.isfinite(out).all()
    # Running the 16-px model at 32 px resamples on the fly: the same function as the loaded one.
    assert torch.allclose(small(images), out, atol=1e-6)
    # Resampling to the same grid is the identity: a same-size load reproduces the model exactly.
    same = TINY.build()
    same.load_state_dict(small.state_dict())
    assert torch.equal(same(images[:, :, :16, :16]), small(images[:, :, :16, :16]))


def test_sincos_model_runs_at_other_resolutions() -> None:
    model = trainable(dataclasses.replace(TINY, posemb="sincos2d")).eval()
    assert torch.isfinite(model(torch.randn(2, 3, 24, 32))).all()


def test_load_pretrained_drops_classifier_of_another_shape() -> None:
    source = trainable(dataclasses.replace(TINY, num_classes=10))
    target = dataclasses.replace(TINY, num_classes=3, image_size=24).build()
    assert load_pretrained(target, source.state_dict()) == ["classifier.weight", "classifier.bias"]
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.classifier.weight.abs().sum() == 0
    with pytest.raises(RuntimeError):
        load_pretrained(dataclasses.replace(TINY, pool="map").build(), source.state_dict())


# --------------------------------------------------------------------------- names and bad input

def test_variant_shapes_and_defaults() -> None:
    shapes = {n: (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size) for n, c in VARIANTS.items()}
    assert shapes["vit-ti16"] == (192, 12, 768, 3, 16)
    assert shapes["vit-s16"] == (384, 12, 1536, 6, 16)
    assert shapes["vit-h14"] == (1280, 32, 5120, 16, 14)
    assert shapes["vit-gg14"] == (1664, 48, 8192, 16, 14)
    assert shapes["vit-so400m14"] == (1152, 27, 4304, 16, 14)
    assert [n for n, c in VARIANTS.items() if c.pool == "map"] == ["vit-g14", "vit-gg14", "vit-so400m14"]
    assert all(c.dropout == 0.0 and c.drop_path_rate == 0.0 and c.posemb == "learn" for c in VARIANTS.values())
    for name, cfg in VARIANTS.items():
        assert cfg.name == name and parse_name(name) == cfg
        assert config_from_dict(ViTConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("ViT-B/16", "vit-b16"), ("vit-b/16", "vit-b16"), ("ViT-Ti/16", "vit-ti16"), ("VIT-L16", "vit-l16"),
        ("ViT-g/14", "vit-g14"), ("ViT-G/14", "vit-gg14"), ("vit-GG14", "vit-gg14"),
        ("SoViT-400m/14", "vit-so400m14"), ("ViT-So400m/14", "vit-so400m14"),
        ("vit_base_patch16_224", "vit-b16"), ("vit_gigantic_patch14_224", "vit-gg14"),
        ("vit_so400m_patch14_siglip_224", "vit-so400m14"), ("ViT-B/32", "vit-b32"), (" vit-tiny ", "vit-tiny"),
    ],
)
def test_paper_and_timm_spellings(spelling: str, canonical: str) -> None:
    cfg = parse_name(spelling)
    assert cfg is not None and cfg.name == canonical


def test_timm_suffix_sets_image_size() -> None:
    assert parse_name("vit_base_patch16_384").image_size == 384


@pytest.mark.parametrize(
    "name, shape",
    [
        ("vit-w32-d4-p4", (32, 4, 128, 2, 4)),
        ("vit-w48-d2-p2", (48, 2, 192, 2, 2)),
        ("vit-w64-d4-p4", (64, 4, 256, 2, 4)),
        ("vit-w256-d6-p8", (256, 6, 1024, 4, 8)),
        ("vit-w96-d3-p4-m200-h3", (96, 3, 200, 3, 4)),
    ],
)
def test_scaled_names_round_trip(name: str, shape: tuple[int, ...]) -> None:
    cfg = parse_name(name)
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) == shape
    assert cfg.name == name and parse_name(cfg.name) == cfg


def test_default_heads_keep_head_dim_sensible() -> None:
    assert [default_num_heads(w) for w in (1, 32, 33, 48, 64, 192, 384, 768, 1024)] == [1, 2, 1, 2, 2, 3, 6, 12, 16]
    odd = ViTConfig(width=96, depth=2, mlp_dim=100, num_heads=4, patch_size=4)
    assert parse_name(odd.name) == odd


@pytest.mark.parametrize("name", ["nfnet-f0", "resnet50", "vitals", "NFNet-F7+"])
def test_non_vit_names_are_none(name: str) -> None:
    assert parse_name(name) is None


@pytest.mark.parametrize("name", ["vit-x16", "vit-w32-d2", "vit-G14", "vit-b", "ViT-Q/16", "vit-w0-d2-p4", "vit"])
def test_malformed_vit_names(name: str) -> None:
    with pytest.raises(UserError):
        parse_name(name)


def test_bad_resolution_is_one_line_user_error() -> None:
    with pytest.raises(UserError, match="use 224 or 240") as err:
        VARIANTS["vit-b16"].forward_flops(225)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="smaller than one"):
        VARIANTS["vit-b16"].check_resolution(8)
    with pytest.raises(UserError):
        TINY.build()(torch.randn(1, 3, 18, 16))
    VARIANTS["vit-h14"].check_resolution(518)


@pytest.mark.parametrize(
    "overrides",
    [dict(num_heads=5), dict(pool="cls"), dict(posemb="rope"), dict(image_size=18), dict(dropout=1.0),
     dict(width=30, num_heads=2, posemb="sincos2d"), dict(depth=0)],
)
def test_bad_config_is_user_error(overrides: dict) -> None:
    with pytest.raises(UserError):
        dataclasses.replace(TINY, **overrides)
