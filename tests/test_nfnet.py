"""NFNets: published sizes, analytic FLOPs vs torch's counter, reference numerics, names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from convscale.errors import UserError
from convscale.models.base import config_from_dict, config_json, config_to_dict
from convscale.models.layers import (
    ACTIVATION_GAMMAS,
    Activation,
    ScaledStdConv2d,
    _StandardizeWeight,
    avg_pool_same_2x,
    same_padding,
    standardize_weight,
)
from convscale.models.nfnet import VARIANTS, NFNetConfig, parse_name

# [B] Table 3: parameters (M) and MACs (G) at the test resolution.
PUBLISHED = {
    "nfnet-f0": (71.5, 12.38, 256),
    "nfnet-f1": (132.6, 35.54, 320),
    "nfnet-f2": (193.8, 62.59, 352),
    "nfnet-f3": (254.9, 114.76, 416),
    "nfnet-f4": (316.1, 215.24, 512),
    "nfnet-f5": (377.2, 289.76, 544),
    "nfnet-f6": (438.4, 377.28, 576),
}


def n_params(cfg: NFNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cfg.build().parameters())


def counted_flops(cfg: NFNetConfig, resolution: int, device: str = "meta") -> int:
    with torch.device(device):
        model = cfg.build()
        x = torch.randn(2, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2  # per image


def tiny(**kw) -> NFNetConfig:
    return dataclasses.replace(VARIANTS["nfnet-tiny"], num_classes=10, **kw)


# --- published numbers --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_paper(name):
    params_m, _, _ = PUBLISHED[name]
    assert abs(n_params(VARIANTS[name]) / 1e6 - params_m) < 0.1


def test_plus_variant_param_counts():
    # F4+ is 525.0M in a recount of [B] App. A.5 (paper prints 527M); "+" widens every stage.
    assert abs(n_params(VARIANTS["nfnet-f4+"]) / 1e6 - 525.0) < 0.1
    assert n_params(VARIANTS["nfnet-f7+"]) > n_params(VARIANTS["nfnet-f7"]) > n_params(VARIANTS["nfnet-f6"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_analytic_flops_match_paper(name):
    _, gmacs, test_px = PUBLISHED[name]
    macs = VARIANTS[name].forward_flops(test_px) / 2
    assert abs(macs / 1e9 / gmacs - 1) < 0.005


@pytest.mark.parametrize(
    "name,resolution",
    [("nfnet-f0", 224), ("nfnet-f0", 257), ("nfnet-f1+", 193), ("nfnet-w0.5-d2.1", 99)],
)
def test_analytic_flops_equal_flop_counter_meta(name, resolution):
    cfg = parse_name(name)
    assert counted_flops(cfg, resolution) == pytest.approx(cfg.forward_flops(resolution), rel=0.01)


@pytest.mark.parametrize("resolution", [16, 17, 31, 47])
def test_analytic_flops_equal_flop_counter_real(resolution):
    cfg = parse_name("nfnet-w0.0625-d1.2.1")
    assert counted_flops(cfg, resolution, "cpu") == pytest.approx(cfg.forward_flops(resolution), rel=0.01)


def test_flops_grow_with_resolution_and_classes():
    cfg = VARIANTS["nfnet-f0"]
    assert cfg.forward_flops(256) > cfg.forward_flops(224)
    more = dataclasses.replace(cfg, num_classes=2000)
    assert more.forward_flops(224) - cfg.forward_flops(224) == 2 * 3072 * 1000


# --- architecture details of the reference ------------------------------------------------------
def test_reference_shapes_and_widths():
    f0, f3p = VARIANTS["nfnet-f0"], VARIANTS["nfnet-f3+"]
    assert f0.depths == (1, 2, 6, 3) and VARIANTS["nfnet-f7"].depths == (8, 16, 48, 24)
    assert f0.stem_widths == (16, 32, 64, 128) and f3p.stem_widths == (16, 32, 64, 192)
    assert f3p.widths == (384, 768, 2048, 2048) and f3p.final_width == 4096
    # "+" stage 1: 384 * 0.5 = 192 -> one group of 128 channels, as the reference rounds.
    assert [(b.mid_ch, b.groups) for b in f3p.blocks()][:5] == [(128, 1)] * 4 + [(384, 3)]
    assert VARIANTS["nfnet-f0"].drop_rate == 0.2 and VARIANTS["nfnet-f7+"].drop_rate == 0.5
    assert VARIANTS["nfnet-f2"].drop_path_rate == 0.25 and parse_name("nfnet-w1-d1.1").drop_path_rate == 0


def test_scaled_width_keeps_group_count():
    cfg = parse_name("nfnet-w0.0625-d1.1.1")
    assert cfg.widths == (16, 32, 96) and cfg.stem_widths == (1, 2, 4, 8)
    assert [(b.mid_ch, b.groups) for b in cfg.blocks()] == [(8, 1), (16, 2), (48, 6)]


def test_betas_and_stochastic_depth_rates():
    cfg = VARIANTS["nfnet-f0"]
    blocks = cfg.blocks()
    betas = [round(b.beta**-2, 6) for b in blocks]
    # A stage's first block sees the previous stage's variance; after it the expected
    # variance restarts at 1 + alpha^2 and grows by alpha^2 per block (depths 1, 2, 6, 3).
    assert betas == [1.0, 1.04, 1.04, 1.08, 1.04, 1.08, 1.12, 1.16, 1.2, 1.24, 1.04, 1.08]
    assert [b.drop_path_rate for b in blocks] == pytest.approx([0.25 * i / 12 for i in range(12)])
    assert [b.stride for b in blocks] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]


def test_parameter_names_and_inits():
    model = tiny(drop_rate=0.1).build()
    names = dict(model.named_parameters())
    assert isinstance(model.classifier, torch.nn.Linear)
    assert float(model.classifier.weight.detach().std()) == pytest.approx(0.01, rel=0.2)
    assert torch.all(model.classifier.bias == 0)
    gains = [n for n in names if n.endswith(".gain")]
    skips = [n for n in names if n.endswith("skip_gain")]
    assert len(skips) == 3 and all(names[n].item() == 0 for n in skips)
    assert len(gains) == 4 + 3 * 4 + 3 + 1  # stem, 4 convs per block, 3 shortcuts, final conv
    assert all(torch.all(names[n] == 1) for n in gains)
    assert "stages.2.0.conv1b.weight" in names and "stages.0.0.se.fc0.bias" in names


def test_gelu_gamma_makes_unit_variance():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    for name in ("gelu", "relu"):
        act = Activation(name)
        assert float((act(x) * act.gamma).var()) == pytest.approx(1.0, abs=0.01)
    assert ACTIVATION_GAMMAS["gelu"] == 1.7015043497085571


def test_weight_standardization_matches_reference_formula():
    conv = ScaledStdConv2d(8, 4, 3, groups=2)
    with torch.no_grad():
        conv.gain.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
        conv.weight[3] = 0.5  # constant filter: variance 0, so eps = 1e-4 takes over
    w = conv.weight.detach().double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    ref = (w - mean) / torch.sqrt(torch.clamp(var * 36, min=1e-4)) * conv.gain.detach().double().view(-1, 1, 1, 1)
    got = conv.standardized_weight().detach().double()
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose((got[:3] ** 2).sum(dim=(1, 2, 3)), conv.gain[:3].double() ** 2, rtol=1e-4)


@pytest.mark.parametrize("clamped", [True, False])
@pytest.mark.parametrize("shape,channels_last", [((6, 4, 3, 3), False), ((6, 4, 3, 3), True), ((5, 7, 1, 1), True)])
def test_weight_standardization_gradients_match_autograd_reference(shape, channels_last, clamped):
    """Both ways of standardizing (the hand-written autograd.Function, and what the conv calls:
    batch norm for small CPU weights unless a row takes eps) against autograd through the
    reference formula, in float64; ``clamped``: rows where eps is taken (constant and
    near-constant filters)."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    if clamped:
        w[1] = 0.3
        w[2] = 0.3 + 1e-4 * torch.randn_like(w[2])
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    gain = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
    rstd = torch.rsqrt(torch.clamp(var * w[0].numel(), min=1e-4))
    for scale in (1.0, 1.7):
        ref = (w - mean) * (gain.view(-1, 1, 1, 1) * scale) * rstd
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (w, gain), g, retain_graph=True)
        for got in (_StandardizeWeight.apply(w, gain, scale, 1e-4), standardize_weight(w, gain, scale)):
            assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(torch.autograd.grad(got, (w, gain), g), ref_grads):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        took_batch_norm = got.grad_fn.name() != "_StandardizeWeightBackward"
        assert took_batch_norm != clamped
    assert torch.autograd.gradcheck(lambda w, g: _StandardizeWeight.apply(w, g, 1.3, 1e-4), (w, gain))
    assert torch.autograd.gradcheck(lambda w, g: standardize_weight(w, g, 1.3), (w, gain))


def test_same_padding_is_tensorflow_same():
    assert same_padding(6, 3, 2) == (0, 1) and same_padding(5, 3, 2) == (1, 1)
    assert same_padding(7, 3, 1) == (1, 1) and same_padding(8, 1, 2) == (0, 0)
    conv = ScaledStdConv2d(1, 1, 3, stride=2)
    for size, first_row in ((6, 0), (5, -1)):  # TF windows start at 0 (even) or -1 (odd)
        x = torch.randn(1, 1, size, size)
        w = conv.standardized_weight().detach()[0, 0]
        xpad = torch.nn.functional.pad(x, (2, 2, 2, 2))[0, 0]
        out = conv(x).detach()[0, 0]
        assert out.shape == (-(-size // 2),) * 2
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                r, c = 2 * i + first_row + 2, 2 * j + first_row + 2
                assert float(out[i, j]) == pytest.approx(float((xpad[r : r + 3, c : c + 3] * w).sum()), abs=1e-5)


def test_avg_pool_same_excludes_padding():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = avg_pool_same_2x(x)[0, 0]
    assert out.shape == (3, 3)
    assert float(out[0, 0]) == (0 + 1 + 5 + 6) / 4
    assert float(out[0, 2]) == (4 + 9) / 2 and float(out[2, 2]) == 24


# --- real forward/backward on the tiny variant --------------------------------------------------
def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.1, drop_path_rate=0.2).build()
    assert sum(p.numel() for p in model.parameters()) < 20_000
    x = torch.randn(4, 3, 33, 33)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Under SkipInit only the skip gains (and head) learn at step 0; the gains do get signal.
    assert all(float(b.skip_gain.grad.abs()) > 0 for s in model.stages for b in s)


def reference_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The NFNet function written out as the reference does (eval mode): gamma and beta
    multiplied on the activations, weight standardisation by autograd through var_mean, SE,
    skip gain and alpha applied one after another."""
    act = model.final_act
    gamma = ACTIVATION_GAMMAS[act.name]

    def conv(c: ScaledStdConv2d, t: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(c.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        w = (c.weight - mean) * c.gain.view(-1, 1, 1, 1) * torch.rsqrt(torch.clamp(var * c.fan_in, min=c.eps))
        if c.dynamic_pad:
            (kh, kw), (sh, sw) = c.kernel_size, c.stride
            t = torch.nn.functional.pad(t, same_padding(t.shape[-1], kw, sw) + same_padding(t.shape[-2], kh, sh))
        return torch.nn.functional.conv2d(t, w, c.bias, c.stride, c.padding, 1, c.groups)

    for i in range(4):
        x = conv(model.stem[2 * i], x)
        x = act.fn(x) * gamma if i < 3 else x
    for stage in model.stages:
        for b in stage:
            out = act.fn(x) * gamma * b.beta
            if b.stride > 1:
                shortcut = conv(b.conv_shortcut, avg_pool_same_2x(out))
            else:
                shortcut = conv(b.conv_shortcut, out) if b.conv_shortcut is not None else x
            out = conv(b.conv0, out)
            out = conv(b.conv1, act.fn(out) * gamma)
            out = conv(b.conv1b, act.fn(out) * gamma)
            out = conv(b.conv2, act.fn(out) * gamma)
            out = b.se(out)
            x = shortcut + out * b.skip_gain * b.alpha
    features = (act.fn(conv(model.final_conv, x)) * gamma).mean((2, 3))
    return model.classifier(features)


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_gradients_equal_unfolded_reference(channels_last):
    """The model's forward (gammas folded into the next conv's weights, hand-written weight
    standardisation, one addcmul per block) is the reference function, in float64."""
    torch.manual_seed(0)
    model = tiny(depths=(1, 2, 1)).build().double().eval()  # identity, projection and pooled shortcuts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):  # skip gains and conv gains away from their inits
                p.copy_(0.5 + torch.rand_like(p))
    x = torch.randn(3, 3, 35, 33, dtype=torch.float64)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    got, ref = model(x), reference_forward(model, x)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_skipinit_blocks_are_identity_on_shortcut_at_init():
    model = tiny().build().eval()
    x = model.stem(torch.randn(2, 3, 32, 32))
    for stage in model.stages:
        for block in stage:
            residual, shortcut = block.branches(x)
            out = block(x)
            assert torch.equal(out, shortcut) and residual.abs().sum() > 0
            x = out


def test_stochastic_depth_is_per_sample_without_rescale():
    torch.manual_seed(0)
    block = tiny(drop_path_rate=0.5).build().stages[2][0]  # rate 0.5 * 2 / 3
    block.skip_gain.data.fill_(1.0)
    x = torch.randn(64, block.conv0.in_channels, 8, 8)
    residual, shortcut = block.branches(x)
    out = block.train()(x)
    kept = torch.isclose(out, shortcut + block.alpha * residual, atol=1e-6).flatten(1).all(1)
    dropped = torch.equal(out[~kept], shortcut[~kept])
    assert dropped and 0 < int(kept.sum()) < 64
    assert torch.allclose(block.eval()(x), shortcut + block.alpha * residual, atol=1e-6)


def test_signal_propagation_at_init():
    """Residual stream within a stage of 12 blocks fed N(0,1), skip gains 1: variance after
    block k is 1 + (k+1) alpha^2 and every residual branch sees ~unit variance. A wrong
    alpha or gamma breaks the first, a missing beta makes the branch variance grow with depth."""
    torch.manual_seed(0)
    cfg = NFNetConfig(depths=(12,), width_mult=0.25)
    stage = cfg.build().stages[0]
    x = torch.randn(32, cfg.stem_widths[-1], 16, 16)
    stream, res = [], []
    with torch.no_grad():
        for block in stage:
            block.skip_gain.fill_(1.0)
            r, _ = block.branches(x)
            x = block(x)
            res.append(float(r.var(dim=(0, 2, 3)).mean()))
            stream.append(float(x.var(dim=(0, 2, 3)).mean()))
    expected = [1 + (k + 1) * 0.2**2 for k in range(12)]
    assert max(abs(s / e - 1) for s, e in zip(stream, expected)) < 0.08
    assert 0.75 < sum(res) / 12 < 1.1
    assert 0.85 < sum(res[-4:]) / sum(res[:4]) < 1.15


def test_signal_stats_report():
    model = tiny().build()
    rows = model.signal_stats(torch.randn(4, 3, 32, 32))
    assert len(rows) == 1 + 3 and all("res_avg_var" in r for r in rows[1:])
    assert rows[0]["expected_var"] == 1.0 and 0.1 < rows[0]["avg_var"] < 10


def test_channels_last_same_output():
    model = tiny().build().eval()
    x = torch.randn(2, 3, 35, 35)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-6)


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_compiles_without_graph_breaks():
    explain = torch._dynamo.explain(tiny(drop_path_rate=0.1).build())(torch.randn(2, 3, 32, 32))
    assert explain.graph_break_count == 0


# --- names and user errors ----------------------------------------------------------------------
@pytest.mark.parametrize("alias,canonical", [
    ("NFNet-F7+", "nfnet-f7+"), ("NFNet F0", "nfnet-f0"), ("nfnet_f1", "nfnet-f1"),
    ("nfnetf3plus", "nfnet-f3+"), ("NFNET-TINY", "nfnet-tiny"),
])
def test_aliases(alias, canonical):
    assert parse_name(alias) == VARIANTS[canonical]


def test_round_trips():
    for name, cfg in VARIANTS.items():
        assert parse_name(name) == cfg and parse_name(cfg.name).shape_key() == cfg.shape_key()
        # the test variant is named by its shape, so it sits in a ladder of scaled sizes
        assert cfg.name == (name if name != "nfnet-tiny" else "nfnet-w0.03125-d1.1.1")
    for name in ("nfnet-w0.0625-d1.1.1", "nfnet-w0.5+-d2.3", "nfnet-w2-d1.1.1.1"):
        assert parse_name(name).name == name
    odd = NFNetConfig(depths=(3, 1), width_mult=1 / 3, num_classes=7)
    assert parse_name(odd.name).shape_key() == odd.shape_key()
    assert NFNetConfig(depths=[2, 4, 12, 6], plus=True).name == "nfnet-f1+"
    assert parse_name("nfnet-w1-d4.8.24.12").name == "nfnet-f3"
    cfg = dataclasses.replace(VARIANTS["nfnet-f3+"], num_classes=10)
    assert config_from_dict(NFNetConfig, config_to_dict(cfg)) == cfg
    assert '"family": "nfnet"' in config_json(cfg)


def test_scaled_name_fields():
    cfg = parse_name("nfnet-w0.0625-d1.1.1")
    assert (cfg.depths, cfg.width_mult, cfg.plus) == ((1, 1, 1), 0.0625, False)
    assert parse_name("NFNet-W0.25+-D2.2").plus


@pytest.mark.parametrize("name", ["vit-b16", "resnet50", "", "nf-resnet50"])
def test_not_nfnet_names(name):
    assert parse_name(name) is None


@pytest.mark.parametrize("name", ["nfnet-f9", "nfnet-f0x", "nfnet-w-d1", "nfnet-w0.5-d", "nfnet-w0-d1.1",
                                  "nfnet-w1-d1.1.1.1.1", "nfnet-w1-d0.1", "nfnets"])
def test_malformed_names(name):
    with pytest.raises(UserError) as e:
        parse_name(name)
    assert "\n" not in str(e.value) and "nfnet-" in str(e.value)


def test_resolution_check_and_bad_configs():
    VARIANTS["nfnet-f0"].check_resolution(32)
    with pytest.raises(UserError, match="at least 32"):
        VARIANTS["nfnet-f0"].check_resolution(31)
    with pytest.raises(UserError, match="at least 16"):
        parse_name("nfnet-w0.5-d1.1.1").check_resolution(8)
    for bad in (dict(activation="swish"), dict(depths=()), dict(drop_rate=1.0), dict(width_mult=-1)):
        with pytest.raises(UserError):
            NFNetConfig(**bad)


def test_ws_conv_under_fsdp_layouts_and_dtypes():
    """FSDP2 hands a conv its weight contiguous (NCHW) and, with bf16 mixed precision, in bf16.
    Under an NHWC input the layer standardises an NHWC copy (the conv sees one format, the
    output is NHWC); a bf16 weight is standardised in fp32, as the rounded fp32 weight would be."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 16, kernel_size=3)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    ref = conv(x)
    nhwc = ScaledStdConv2d(8, 16, kernel_size=3)
    nhwc.load_state_dict(conv.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ref, nhwc(x), rtol=1e-5, atol=1e-6)
    low = ScaledStdConv2d(8, 16, kernel_size=3)
    low.load_state_dict(conv.state_dict())
    rounded = ScaledStdConv2d(8, 16, kernel_size=3)
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in conv.state_dict().items()})
    low = low.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = low(x), rounded(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_pointwise_conv_as_matmul_is_the_same_function():
    """A 1x1 conv of an NHWC CPU input runs as F.linear: the output (NHWC strides kept) and every
    gradient equal F.conv2d's; strided, grouped and NCHW cases still take the conv."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 16, kernel_size=1, input_scale=1.7)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.bias.normal_()
    x0 = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    got = []
    for matmul in (True, False):
        conv.pointwise_matmul = matmul
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        assert conv._pointwise(x) is matmul
        y = conv(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        got.append((y, x.grad, conv.weight.grad, conv.gain.grad, conv.bias.grad))
    assert got[0][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    conv.pointwise_matmul = True
    assert not conv._pointwise(torch.randn(4, 8, 5, 5))  # NCHW input
    assert not ScaledStdConv2d(8, 16, kernel_size=1, stride=2)._pointwise(x0)
    assert not ScaledStdConv2d(8, 16, kernel_size=1, groups=2)._pointwise(x0)
    assert not ScaledStdConv2d(8, 16, kernel_size=3)._pointwise(x0)


def test_channels_last_model_stays_nhwc_through_a_one_channel_stem():
    """nfnet-w0.046875's stem starts with 1 channel, whose strides are both NCHW and NHWC: the conv
    after it returned NCHW, and the whole model then ran NCHW against NHWC weights. Under
    to_channels_last every conv's input after the first is NHWC, and the logits are the NCHW model's."""
    from convscale.models import get_config
    from convscale.models.layers import to_channels_last

    torch.manual_seed(0)
    cfg = get_config("nfnet-w0.046875-d1.1.1", num_classes=10)
    assert cfg.stem_widths[0] == 1
    ref = cfg.build()
    model = to_channels_last(cfg.build())
    model.load_state_dict(ref.state_dict())
    seen = []
    for m in model.modules():
        if isinstance(m, ScaledStdConv2d):
            m.register_forward_hook(lambda mod, i, o: seen.append(
                (i[0].shape[1] > 1 and i[0].is_contiguous(memory_format=torch.channels_last)
                 and not i[0].is_contiguous()) or i[0].shape[1] == 1 or i[0].shape[-1] == 1))
    x = torch.randn(4, 3, 16, 16)
    out = model(x.contiguous(memory_format=torch.channels_last))
    assert len(seen) > 10 and all(seen)
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
