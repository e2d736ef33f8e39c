"""ConvNeXt family: published parameter counts and FLOPs, flop-counter agreement, names, one real step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from convscale.errors import UserError
from convscale.models import config_from_json_dict, count_params, get_config
from convscale.models.base import config_to_dict
from convscale.models.convnext import VARIANTS, ConvNeXtBlock, ConvNeXtConfig, parse_name

SMALL = "convnext-w16-d1.2.1"


def counted_flops(cfg: ConvNeXtConfig, resolution: int, device: str = "meta", batch: int = 2) -> float:
    """torch.utils.flop_counter FLOPs per image (convolutions and linear layers; nothing added by hand)."""
    with torch.device(device):
        model = cfg.build()
        images = torch.randn(batch, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / batch


# --------------------------------------------------------------------------- published numbers

@pytest.mark.parametrize(
    "name, timm_params, published_gmacs",
    [  # timm convnext_{tiny,small,base,large,xlarge} at 1000 classes; Liu et al. 2022 Table 1/9 GFLOPs (= GMACs)
        ("convnext-t", 28_589_128, 4.5),
        ("convnext-s", 50_223_688, 8.7),
        ("convnext-b", 88_591_464, 15.4),
        ("convnext-l", 197_767_336, 34.4),
        ("convnext-xl", 350_196_968, 60.9),
    ],
)
def test_params_and_flops_match_published(name, timm_params, published_gmacs):
    cfg = get_config(name)
    assert count_params(cfg) == timm_params
    # the paper's "FLOPs" are MACs; ours are 2 x MACs and leave norms out (under 1 % here)
    assert cfg.forward_flops(224) / 2e9 == pytest.approx(published_gmacs, abs=0.05)
    assert count_params(cfg, include_head=False) == timm_params - cfg.head_params


@pytest.mark.parametrize("name, resolution", [("convnext-t", 224), ("convnext-b", 224), ("convnext-t", 160)])
def test_analytic_flops_equal_flop_counter_meta(name, resolution):
    cfg = parse_name(name)
    assert counted_flops(cfg, resolution) == pytest.approx(cfg.forward_flops(resolution), rel=1e-6)


@pytest.mark.parametrize("resolution", [16, 17, 32, 45])
def test_analytic_flops_equal_flop_counter_real(resolution):
    cfg = parse_name(SMALL)
    assert counted_flops(cfg, resolution, "cpu") == pytest.approx(cfg.forward_flops(resolution), rel=1e-6)


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("alias, canonical", [
    ("ConvNeXt-T", "convnext-t"), ("convnext_tiny", "convnext-t"), ("ConvNeXt-XL", "convnext-xl"),
    ("convnext_large", "convnext-l"), ("CONVNEXT-W32-D1.1.3.1", "convnext-w32-d1.1.3.1"),
    ("convnext-w96-d3.3.9.3", "convnext-t"), ("convnext-c96.192.384.768-d3.3.27.3", "convnext-s"),
])
def test_names_and_aliases(alias, canonical):
    assert get_config(alias).name == canonical


@pytest.mark.parametrize("name", ["convnext-w32-d1.1.3.1", "convnext-c16.24.48-d1.1.1", "convnext-w8-d2-k5"])
def test_scaled_names_round_trip(name):
    cfg = get_config(name, num_classes=10)
    assert cfg.name == name
    assert get_config(cfg.name, num_classes=10) == cfg
    assert config_from_json_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("bad", ["convnext-q", "convnext-w16-d1.1.1.1.1", "convnext-w0-d1", "convnext-w8-d2-k4"])
def test_bad_names_are_user_errors(bad):
    with pytest.raises(UserError):
        get_config(bad)


def test_resolution_below_total_stride_is_a_user_error():
    cfg = get_config("convnext-w16-d1.1.1.1")  # total stride 32
    with pytest.raises(UserError, match="total stride 32"):
        cfg.forward_flops(16)
    get_config("convnext-w16-d1.1.1").check_resolution(16)


# --------------------------------------------------------------------------- the architecture

def test_block_layout_layer_scale_and_drop_path():
    cfg = dataclasses.replace(parse_name("convnext-w8-d2.2"), drop_path_rate=0.3)
    model = cfg.build()
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(blocks) == 4
    assert all(torch.all(b.layer_scale_gain == 1e-6) for b in blocks)
    assert blocks[0].dwconv.kernel_size == (7, 7) and blocks[0].dwconv.groups == 8
    assert blocks[0].fc1.out_features == 32  # 4x expansion
    assert [b.drop_path.rate for b in blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # with layer scale 1e-6 each block is ~identity at init
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(blocks[0](x), x, atol=1e-4)


def test_initial_loss_is_ln_c_and_one_step_trains():
    torch.manual_seed(0)
    model = get_config(SMALL, num_classes=10).build()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-5)
    torch.nn.init.normal_(model.classifier.weight, std=0.1)  # so the body gets a gradient on step one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.stem.conv.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert not torch.equal(before, model.stem.conv.weight)


def test_config_validation():
    with pytest.raises(UserError):
        ConvNeXtConfig(depths=(1, 1), widths=(8,))
    with pytest.raises(UserError):
        ConvNeXtConfig(depths=(1,), widths=(8,), drop_path_rate=1.0)


def test_variants_are_the_five_sizes():
    assert list(VARIANTS) == ["convnext-t", "convnext-s", "convnext-b", "convnext-l", "convnext-xl"]


def test_weight_decay_skips_every_vector_by_name():
    """The house's by-name rule (train/optim.py) leaves norms, biases and layer scales undecayed,
    as timm does for ConvNeXt (every tensor of ndim <= 1), and decays every conv and linear weight."""
    from convscale.train.optim import no_weight_decay

    model = get_config("convnext-w8-d1.1", num_classes=3).build()
    for name, p in model.named_parameters():
        assert no_weight_decay(name) == (p.ndim <= 1), name
