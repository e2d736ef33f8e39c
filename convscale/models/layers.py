"""Layers shared by the model families (kept apart from the architectures that use them)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool, scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if scale_by_keep:
        mask = mask / keep
    return x * mask


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.rate = float(rate)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


# ---------------------------------------------------------------------------------------------
# Normalizer-free layers (NFNets). Numerics follow DeepMind's reference (nfnets/base.py).
# ---------------------------------------------------------------------------------------------

# gamma such that gamma * f(x) has unit variance for x ~ N(0, 1) (the reference's constants).
# "gelu" is the tanh approximation, as jax.nn.gelu's default that the constant was computed for.
ACTIVATION_GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    # exact (erf) GELU with the tanh form's constant, as timm's NFNets pair them: a timm dm_nfnet
    # checkpoint computes this function (models/timm_weights.py)
    "gelu_erf": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "celu": F.celu,
    "elu": F.elu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_erf": F.gelu,
    "leaky_relu": F.leaky_relu,
    "log_sigmoid": F.logsigmoid,
    "relu": F.relu,
    "relu6": F.relu6,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "soft_sign": F.softsign,
    "softplus": F.softplus,
    "tanh": torch.tanh,
}


class Activation(nn.Module):
    """``f(x)`` for one of ``ACTIVATION_GAMMAS``' names, with ``gamma`` beside it: gamma * f(x)
    has unit variance for x ~ N(0, 1). The NFNet does not multiply the activations by gamma but
    hands it to their consumer (``ScaledStdConv2d(input_scale=...)``, or the pooled features),
    which is the same function and saves a pass over the tensor forward and backward."""

    def __init__(self, name: str = "gelu"):
        super().__init__()
        self.name = name
        self.fn = _ACTIVATIONS[name]
        self.gamma = ACTIVATION_GAMMAS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6g} (applied by the consumer)"


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis: output size is ceil(size / stride),
    the odd pixel of an uneven total goes after (bottom/right)."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _fan_in_rows(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A conv weight (or its gradient) as (1, out_channels, fan_in), a view where the layout
    allows; for channels_last weights each row is in their memory order."""
    if channels_last:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(1, t.shape[0], -1)


def _as_weight(rows: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """Inverse of ``_fan_in_rows``."""
    if channels_last:
        o, i, kh, kw = shape
        return rows.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.view(shape)


# For rows where eps is taken, the backward's batch-norm kernel gets this power of two as its
# "invstd": the variance term it adds is then ~2**-120 of the rest (far below float rounding;
# it must vanish, the clamp has no gradient) and scaling by it and back is exact.
_CLAMPED_INVSTD = 2.0**-60


class _StandardizeWeight(torch.autograd.Function):
    """``(W - mean) * gain * scale * rsqrt(max(fan_in * var, eps))`` per output channel, with
    fan_in * var = ||W - mean||^2 over the channel's fan-in. Forward: mean, centre, one norm, one
    multiply (``torch.var_mean`` is ~20x slower on CPU); backward: one batch-norm backward
    kernel (sums and output in two fused passes) instead of ~10 autograd ops. ``scale`` is a
    constant the conv's input would be multiplied by, folded in here on the (small) weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
        channels_last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
        rows = _fan_in_rows(weight, channels_last)
        mean = rows.mean(2, keepdim=True)
        centered = rows - mean
        norm = torch.linalg.vector_norm(centered, dim=2, keepdim=True)  # sqrt(fan_in * var)
        denom = norm.clamp(min=eps**0.5)
        mult = gain.view(1, -1, 1) / denom
        if scale != 1.0:
            mult = mult * scale
        ctx.save_for_backward(rows, mean, norm, denom, mult)
        ctx.scale, ctx.sqrt_eps, ctx.channels_last = scale, eps**0.5, channels_last
        return _as_weight(centered.mul_(mult), weight.shape, channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, mean, norm, denom, mult = ctx.saved_tensors
        unclamped = norm >= ctx.sqrt_eps  # as clamp's gradient, which passes at the bound
        # Unclamped rows: out = (W - mean) * invstd * (mult / invstd), invstd = 1 / std, which is
        # batch norm over the row with affine weight mult / invstd.
        sqrt_k = rows.shape[2] ** 0.5
        invstd = torch.where(unclamped, sqrt_k / denom, _CLAMPED_INVSTD)
        grad_rows, dot_invstd, _ = torch.ops.aten.native_batch_norm_backward(
            _fan_in_rows(grad, ctx.channels_last), rows, (mult / invstd).view(-1), None, None,
            mean.view(-1), invstd.view(-1), True, 0.0, [True, ctx.needs_input_grad[1], False])
        grad_gain = None
        if ctx.needs_input_grad[1]:  # d out / d gain = (W - mean) * scale / denom: dot * scale / denom
            grad_gain = dot_invstd / (invstd * denom).view(-1)
            if ctx.scale != 1.0:
                grad_gain = grad_gain * ctx.scale
        return _as_weight(grad_rows, grad.shape, ctx.channels_last), grad_gain, None, None


# Below this many elements a weight is standardized by torch's batch norm when it can be (see
# ``standardize_weight``): ~25 us less per conv and step for small weights on CPU, slower for
# large ones (measured crossover ~30k elements, torch 2.13, 1 thread).
_BATCH_NORM_MAX_NUMEL = 32768


def standardize_weight(weight: torch.Tensor, gain: torch.Tensor, scale: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``scale * (W - mean) * gain * rsqrt(max(fan_in * var, eps))`` per output channel.

    Small CPU weights (eager) go through batch norm over the rows (eps 1e-30 only keeps a zero
    variance finite): where no row takes ``eps`` it is the same function, with torch's native
    backward; when one does, or under torch.compile, or on other devices, ``_StandardizeWeight``."""
    if weight.numel() <= _BATCH_NORM_MAX_NUMEL and weight.device.type == "cpu" and not torch.compiler.is_compiling():
        rows = weight.reshape(1, weight.shape[0], -1)
        sqrt_k = rows.shape[2] ** 0.5
        out, _, invstd = torch.native_batch_norm(rows, gain * (scale / sqrt_k), None, None, None, True, 0.0, 1e-30)
        if bool((invstd <= sqrt_k / eps**0.5).all()):  # every fan_in * var = k / invstd^2 >= eps
            return out.view(weight.shape)
    return _StandardizeWeight.apply(weight, gain, scale, eps)


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardization, a learnable per-channel ``gain`` (init 1) and
    ``bias`` (init 0), and TF "SAME" padding, as DeepMind's ``WSConv2D``:

        W_hat = (W - mean) * gain / sqrt(max(fan_in * var, eps)),   eps = 1e-4

    (mean/var over each output channel's fan-in, population variance). Convolutions with stride
    1 and an odd kernel get static symmetric padding; others pad from the input size at run time,
    so odd image sizes work exactly as in the reference.

    ``input_scale``: a constant the input is taken to be multiplied by (the activation's gamma,
    times an NFNet block's beta), applied as ``conv(x, input_scale * W_hat)``: the same as
    ``conv(input_scale * x, W_hat)`` (zero padding and the bias commute with it) at the cost
    of a weight-sized product instead of an activation-sized one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, dilation: int = 1, eps: float = 1e-4, input_scale: float = 1.0):
        total = (kernel_size - 1) * dilation
        self.dynamic_pad = stride > 1 or total % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if self.dynamic_pad else total // 2, dilation=dilation,
                         groups=groups, bias=True)
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.eps = eps
        self.input_scale = float(input_scale)
        self.fan_in = (in_channels // groups) * kernel_size * kernel_size
        # The reference's VarianceScaling(1.0, "fan_in", "normal"); WS makes the choice minor.
        nn.init.normal_(self.weight, std=self.fan_in**-0.5)
        nn.init.zeros_(self.bias)

    #: a 1x1, stride-1, ungrouped conv of an NHWC CPU input runs as one matrix product (F.linear
    #: over the channel axis): the same function, without oneDNN's per-call convolution overhead,
    #: which dominates the tiny convs of small models (benchmarks/small_models.py). Set False on an
    #: instance to take F.conv2d.
    pointwise_matmul: bool = True
    #: set by ``to_channels_last``: the output is kept NHWC. Without it a conv whose input and weight
    #: have one channel (the stem of the smallest NFNets) returns NCHW, ambiguous strides read as
    #: NCHW, and every later layer of the model then ran NCHW against NHWC weights.
    nhwc: bool = False

    def standardized_weight(self) -> torch.Tensor:
        """W_hat, without ``input_scale``."""
        return standardize_weight(self.weight, self.gain, 1.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            kh, kw = self.kernel_size
            sh, sw = self.stride
            dh, dw = self.dilation
            x = F.pad(x, same_padding(x.shape[-1], kw, sw, dw) + same_padding(x.shape[-2], kh, sh, dh))
        weight, gain = self.weight, self.gain
        if weight.dtype in (torch.bfloat16, torch.float16):  # low-precision parameters (FSDP2 mixed
            weight, gain = weight.float(), gain.float()  # precision): mean and norm still in fp32
        if (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
                and not weight.is_contiguous(memory_format=torch.channels_last)):
            # NHWC input, NCHW weight (FSDP2 keeps parameters contiguous): standardise an NHWC copy,
            # so the conv sees one memory format and the standardised weight is made NHWC directly
            weight = weight.contiguous(memory_format=torch.channels_last)
        weight = standardize_weight(weight, gain, self.input_scale, self.eps)
        if self._pointwise(x):
            nhwc = F.linear(x.permute(0, 2, 3, 1), weight.reshape(weight.shape[0], -1), self.bias)
            return nhwc.permute(0, 3, 1, 2)  # NCHW shape, NHWC strides: as the conv would return
        out = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.nhwc and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last)  # a no-op unless the conv chose NCHW
        return out

    def _pointwise(self, x: torch.Tensor) -> bool:
        return (self.pointwise_matmul and self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1
                and x.dim() == 4 and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", input_scale={self.input_scale:.6g}" if self.input_scale != 1.0 else "")


def avg_pool_same_2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, stride 2, TF "SAME": on odd sizes the last window holds only real
    pixels and is averaged over them (ceil_mode without counting the overhang)."""
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


class SqueezeExcite(nn.Module):
    """``x * gain * sigmoid(fc1(relu(fc0(mean_hw(x)))))`` with plain (not standardized) linears.

    As DeepMind's NFNet code: ReLU without gamma inside, output gain 2 so the block is
    variance-preserving at init (sigmoid ~ 0.5); linears use Haiku's default init
    (truncated normal, std 1/sqrt(fan_in), cut at 2 std; bias 0).
    """

    def __init__(self, channels: int, hidden: int, gain: float = 2.0):
        super().__init__()
        self.fc0 = nn.Linear(channels, hidden)
        self.fc1 = nn.Linear(hidden, channels)
        self.gain = float(gain)
        for fc in (self.fc0, self.fc1):
            std = fc.in_features**-0.5
            nn.init.trunc_normal_(fc.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(fc.bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-(sample, channel) multiplier ``gain * sigmoid(...)``, shape (batch, channels)."""
        s = self.fc1(F.relu(self.fc0(x.mean((2, 3)))))
        return torch.sigmoid(s) * self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model in NHWC: parameters NHWC, except 1x1 conv weights (``.to(channels_last)`` gives
    those strides that their gradients never have, and DDP then copies every such gradient into
    its bucket, warning "Grad strides do not match bucket view strides"; a 1x1 weight is the same
    matrix either way), and every ScaledStdConv2d keeps its output NHWC."""
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.shape[2:] == (1, 1):
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    for m in model.modules():
        if isinstance(m, ScaledStdConv2d):
            m.nhwc = True
    return model
