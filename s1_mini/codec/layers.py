"""Convolutional building blocks of the codec (spec §3).

Activations are time-major, ``x [B, L, C]`` with the channels contiguous, and every
layer takes ``(x, ctx)`` with a :class:`LeftContext` that supplies the layer's earlier
input samples (zeros at the start of a stream). A conv runs as ``conv2d`` over the
channels-last image ``[B, C, L, 1]`` that is the same memory (:func:`image`), so cuDNN's
NHWC kernels read and write the activations where they lie: no layout transposes around
the convs, no copies between them. :meth:`Codec.set_precision` lays the conv weights out
to match (:func:`channels_last`); their shapes, and so the state-dict, stay the
reference's. Module and parameter names mirror the reference state-dict keys once weight
norm is folded (``….conv.weight`` instead of ``….conv.parametrizations.weight.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .context import LeftContext

# How the official checkpoint names the weight-norm tensors (g, v) of a conv, by style.
# Set as ``wn_naming`` on the inner nn.Conv1d / nn.ConvTranspose1d; read by the loader.
PARAMETRIZATION = ("parametrizations.weight.original0", "parametrizations.weight.original1")
LEGACY = ("weight_g", "weight_v")

# Devices on which a dilated conv runs undilated over its dilation phases (see
# CausalConv1d.forward): with the NCHW layout cuDNN picked a slow generic kernel for some
# long dilated bf16 convs (30 of 140 ms of a batch-8 decode on an H100). On the CPU the
# dilated conv is the faster one.
PHASED_DILATION = {"cuda"}


def image(x: Tensor, phases: int = 1) -> Tensor:
    """Time-major ``x [B, L, C]`` as the channels-last image ``[B, C, L / phases, phases]``
    over the same memory: sample ``t = h · phases + w`` is pixel ``(h, w)``."""
    return x.unflatten(1, (-1, phases)).permute(0, 3, 1, 2)


def unimage(y: Tensor) -> Tensor:
    """A conv's channels-last output image ``[B, C, H, W]`` back to time-major ``[B, H · W, C]`` (a view)."""
    return y.permute(0, 2, 3, 1).flatten(1, 2)


def kernel(weight: Tensor) -> Tensor:
    """Conv weight ``[O, I, k]`` as the 2-D kernel ``[O, I, k, 1]``: channels-last if the
    weight is laid out by :func:`channels_last`."""
    return weight.unflatten(2, (-1, 1))


def channels_last(weight: Tensor) -> Tensor:
    """``weight [O, I, k]``, same values, laid out ``[O, k, I]`` in memory."""
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """``x + (α + 1e-9)⁻¹ · sin(αx)²`` per channel (``alpha [C]``), in float32 (spec §3.3)."""
    y = x.float()
    y = y + (alpha + 1e-9).reciprocal() * torch.sin(alpha * y).pow(2)
    return y.to(x.dtype)


def causal_input(x: Tensor, bias: Tensor | None, alpha: Tensor | None, past: Tensor | None, size: int,
                 right: int) -> Tensor:
    """What a causal conv reads, ``[B, size + L + right, C]``: the ``size`` samples before
    ``x`` (``past``, or zeros if None), then ``Snake(x + bias)`` (without the bias if it
    is None, without Snake if ``alpha`` is), then ``right`` zeros. One pass over ``x``
    once compiled (``Codec.compile_pointwise``); eager, the Snake alone is seven float32
    passes."""
    if bias is not None:
        x = x + bias
    if alpha is not None:
        x = snake(x, alpha)
    if past is None:
        return F.pad(x, (0, 0, size, right)) if size or right else x
    # Padded first: compiled, the padded Snake is then written straight into the
    # concatenation (a padded concatenation is two passes).
    return torch.cat([past, F.pad(x, (0, 0, 0, right)) if right else x], 1)


def residual(x: Tensor, y: Tensor, bias: Tensor) -> Tensor:
    """``x + (y + bias)``: a residual unit's output, with its 1x1 conv's bias (one pass once compiled)."""
    return x + (y + bias)


class Chain(nn.ModuleList):
    """Layers applied in order (the reference's ``nn.Sequential`` with indexed keys). A
    Snake is applied by the causal conv that follows it, in its input pass."""

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        alpha = None
        for layer in self:
            if isinstance(layer, Snake):
                alpha = layer.channel_alpha()
            else:
                x, alpha = (layer(x, ctx) if alpha is None else layer(x, ctx, alpha)), None
        return x


class Snake(nn.Module):
    """The Snake activation's parameter (``alpha [1, C, 1]``, spec §3.3); the conv after
    it applies it (:class:`Chain`, :class:`ResidualUnit`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def channel_alpha(self) -> Tensor:
        # A plain tensor, not the Parameter: a compiled input pass then treats the channel
        # count as dynamic too (parameters get static shapes: one compile per width).
        return self.alpha.detach().view(-1)


class CausalConv1d(nn.Module):
    """Conv1d that reads only the past: ``K_eff − stride`` samples of left context.

    Input lengths are multiples of the stride (audio is padded to whole frames), so the
    reference's right padding to a stride multiple never applies here.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride, dilation=dilation, groups=groups)
        self.conv.wn_naming = PARAMETRIZATION if weight_norm else None
        self.context = (kernel_size - 1) * dilation + 1 - stride
        self.input_pass = causal_input  # Codec.compile_pointwise swaps in a compiled one

    def forward(self, x: Tensor, ctx: LeftContext, alpha: Tensor | None = None, pending: Tensor | None = None,
                defer_bias: bool = False) -> Tensor:
        """``x [B, L, C_in]`` → ``[B, L / stride, C_out]``. ``alpha``: a Snake on ``x`` first;
        ``pending``: the bias of the conv before, added to ``x`` before that; ``defer_bias``:
        leave this conv's bias out, for the caller's next pass to add."""
        c, length = self.conv, x.shape[1]
        dilation, stride = c.dilation[0], c.stride[0]
        # Phased: output t = q·d + r only reads inputs of phase r, so the dilated conv is an
        # undilated one over the image [B, C, L / d, d] (the input right-padded to whole
        # phases, the output cropped): the same memory, no copies.
        phases = dilation if dilation > 1 and stride == 1 and x.device.type in PHASED_DILATION else 1
        right = -length % phases
        full = self.input_pass(x, pending, alpha, ctx.past(self, x, self.context), self.context, right)
        ctx.keep(self, full[:, : self.context + length], self.context)
        bias = None if defer_bias else c.bias
        y = F.conv2d(image(full, phases), kernel(c.weight), bias, (stride, 1), 0, (dilation // phases, 1), c.groups)
        return unimage(y)[:, :length] if right else unimage(y)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output is trimmed on the right only (spec §3.2).

    Output sample ``n`` depends on inputs ``⌊n/s⌋ − ⌈k/s⌉ + 1 … ⌊n/s⌋``, so the layer
    keeps ``⌈k/s⌉ − 1`` earlier input samples (one for ``k = 2s``, none for ``k = s``);
    the outputs that belong to them are never computed (the conv's padding drops them).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, weight_norm: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel_size, stride)
        self.conv.wn_naming = PARAMETRIZATION if weight_norm else None
        self.stride = stride
        self.context = -(-kernel_size // stride) - 1
        self.input_pass = causal_input  # Codec.compile_pointwise swaps in a compiled one

    def forward(self, x: Tensor, ctx: LeftContext, alpha: Tensor | None = None) -> Tensor:
        """``x [B, L, C_in]`` → ``[B, L · stride, C_out]``; ``alpha``: a Snake on ``x`` first."""
        full = self.input_pass(x, None, alpha, ctx.past(self, x, self.context), self.context, 0)
        ctx.keep(self, full, self.context)
        s, k = self.stride, self.conv.kernel_size[0]
        # Without padding the output has (L + context − 1)·s + k samples; padding drops the
        # context's context·s on the left and as many on the right, output padding gives
        # back the (context + 1)·s − k of those that are not past the end (k not a multiple of s).
        y = F.conv_transpose2d(image(full), kernel(self.conv.weight), self.conv.bias, (s, 1),
                               (self.context * s, 0), ((self.context + 1) * s - k, 0))
        return unimage(y)


class ResidualUnit(nn.Module):
    """``x + Conv1x1(Snake(CausalConv_k7,d(Snake(x))))`` (spec §3.4)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = Chain(
            [
                Snake(channels),
                CausalConv1d(channels, channels, 7, dilation=dilation),
                Snake(channels),
                CausalConv1d(channels, channels, 1),
            ]
        )
        self.residual = residual  # Codec.compile_pointwise swaps in a compiled one

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        # Each conv's bias is added in the element-wise pass after it (on CUDA a conv's own
        # bias is one more pass over its output): two convs and three passes in all.
        snake1, conv, snake2, pointwise = self.block
        y = conv(x, ctx, snake1.channel_alpha(), defer_bias=True)
        y = pointwise(y, ctx, snake2.channel_alpha(), pending=conv.conv.bias.detach(), defer_bias=True)
        return self.residual(x, y, pointwise.conv.bias.detach())


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (spec §9)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ConvNeXtBlock(nn.Module):
    """Quantizer ConvNeXt block: causal depthwise k7 → LayerNorm → MLP ×4 GELU → γ, residual (spec §3.5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim, weight_norm=False)
        self.norm = LayerNorm32(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x, ctx)))))
        return x + (y * self.gamma).to(x.dtype)
