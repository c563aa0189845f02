"""Convolutional building blocks of the codec (spec §3).

Every layer takes ``(x, ctx)`` with ``x`` channels-first ``[B, C, L]`` and a
:class:`LeftContext` that supplies the layer's earlier input samples (zeros at the
start of a stream). Module and parameter names mirror the reference state-dict keys
once weight norm is folded (``….conv.weight`` instead of ``….conv.parametrizations.weight.*``).
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


class Chain(nn.ModuleList):
    """Layers applied in order (the reference's ``nn.Sequential`` with indexed keys)."""

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        for layer in self:
            x = layer(x, ctx)
        return x


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """``x + (α + 1e-9)⁻¹ · sin(αx)²`` per channel, in float32 (spec §3.3)."""
    y = x.float()
    y = y + (alpha + 1e-9).reciprocal() * torch.sin(alpha * y).pow(2)
    return y.to(x.dtype)


class Snake(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.activation = snake  # Codec.compile_activations swaps in a compiled one

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        # A plain tensor, not the Parameter: a compiled activation then treats the channel
        # count as dynamic too (parameters get static shapes: one compile per width).
        return self.activation(x, self.alpha.detach())


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

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        x = ctx.extend(self, x, self.context)
        c = self.conv
        if x.is_cuda and c.dilation[0] > 1 and c.stride[0] == 1 and c.groups == 1:
            # cuDNN picks a slow generic kernel for some long dilated bf16 convs (30 of
            # 140 ms of a batch-8 decode on an H100): run them undilated on tensor cores.
            return polyphase_conv1d(x, c.weight, c.bias, c.dilation[0])
        return c(x)


def polyphase_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """``F.conv1d(x, weight, bias, dilation=dilation)`` (no padding) as one undilated
    conv over the ``dilation`` interleaved phases of ``x``: output ``t = q·d + r`` only
    reads inputs of phase ``r``. ``x`` is right-padded to whole phases, then cropped."""
    d, (B, C, L) = dilation, x.shape
    out = L - (weight.shape[-1] - 1) * d
    m = -(-L // d)
    phases = F.pad(x, (0, m * d - L)).view(B, C, m, d).permute(0, 3, 1, 2).reshape(B * d, C, m)
    y = F.conv1d(phases, weight, bias)  # [B·d, C_out, m − k + 1]
    y = y.view(B, d, -1, y.shape[-1]).permute(0, 2, 3, 1).reshape(B, -1, y.shape[-1] * d)
    return y[..., :out]


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output is trimmed on the right only (spec §3.2).

    Output sample ``n`` depends on inputs ``⌊n/s⌋ − ⌈k/s⌉ + 1 … ⌊n/s⌋``, so the layer
    keeps ``⌈k/s⌉ − 1`` earlier input samples (one for ``k = 2s``, none for ``k = s``)
    and drops the outputs that belong to them.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, weight_norm: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel_size, stride)
        self.conv.wn_naming = PARAMETRIZATION if weight_norm else None
        self.stride = stride
        self.context = -(-kernel_size // stride) - 1

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        y = self.conv(ctx.extend(self, x, self.context))
        skip = self.context * self.stride
        return y[..., skip : skip + x.shape[-1] * self.stride]


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

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        return x + self.block(x, ctx)


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
        y = self.dwconv(x, ctx).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        y = (y * self.gamma).to(x.dtype)
        return x + y.transpose(1, 2)
