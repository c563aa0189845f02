"""Causal window-limited transformer of the codec (spec §4).

Pre-norm blocks with LayerScale, RMSNorm, SwiGLU FFN and interleaved RoPE whose cos/sin
table is rounded to bfloat16 like the reference's. Keys and values of the last
``window − 1`` positions come from the :class:`LeftContext`, and positions are absolute
frame indices, so a stream decoded in chunks sees exactly what a one-shot decode sees.

Positions past ``block_size`` (4096 frames for the quantizer transformers, 190 s of
audio): the reference has no table entries there and fails; here the table is extended
with the same formula and decoding goes on. Nothing can be compared with the reference
beyond that point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s1_mini.rope import apply_rope, rope_table

from .config import TransformerArgs
from .context import LeftContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32, cast back, then the (float32) weight: the reference order.
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (y * self.weight).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.gamma).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, head_dim: int, window: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window = n_head, head_dim, window
        self.wqkv = nn.Linear(dim, 3 * n_head * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor, ctx: LeftContext) -> Tensor:
        """``x [B, N, dim]``; ``rope`` the table rows and ``pos [B, N]`` the positions of ``x``."""
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.n_head, self.head_dim)).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # Keys and values of the window − 1 previous positions, already rotated.
        past = self.window - 1
        k = ctx.extend((self, "k"), k, past)
        v = ctx.extend((self, "v"), v, past)
        key_pos = pos[:, :1] - past + torch.arange(k.shape[1], device=pos.device)
        q_pos, key_pos = pos[:, None, :, None], key_pos[:, None, None, :]
        # Window of `window` keys including the query itself; negative positions are the
        # zero context of a fresh stream, which the reference never sees.
        mask = (key_pos <= q_pos) & (key_pos > q_pos - self.window) & (key_pos >= 0)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.wo(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: TransformerArgs, window: int) -> None:
        super().__init__()
        self.attention = Attention(args.dim, args.n_head, args.head_dim, window)
        self.feed_forward = FeedForward(args.dim, args.intermediate_size)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention_layer_scale = LayerScale(args.dim)
        self.ffn_layer_scale = LayerScale(args.dim)

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor, ctx: LeftContext) -> Tensor:
        x = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, pos, ctx))
        return x + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(x)))


class WindowedTransformer(nn.Module):
    """Time-major ``[B, N, input_dim]`` in and out; projections only if ``input_dim ≠ dim``."""

    def __init__(self, args: TransformerArgs, input_dim: int, window: int) -> None:
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args, window) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if input_dim != args.dim:
            self.input_proj = nn.Linear(input_dim, args.dim)
            self.output_proj = nn.Linear(args.dim, input_dim)
        else:
            self.input_proj = self.output_proj = None
        self._rope = torch.empty(0)

    def _rope_rows(self, pos: Tensor, needed: int) -> Tensor:
        """Table rows of ``pos``, whose values are all below ``needed`` (known to the
        host, so that looking them up never reads the device)."""
        if self._rope.shape[0] < needed or self._rope.device != pos.device:
            # The reference's table covers block_size positions; grow past it on demand.
            length = self.args.block_size if needed <= self.args.block_size else 2 * needed
            self._rope = rope_table(length, self.args.head_dim, self.args.rope_base, pos.device)
        return self._rope[pos]

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        if self.input_proj is not None:
            x = self.input_proj(x)
        steps = ctx.steps_per_frame(x)
        pos = ctx.positions(steps, x.shape[1])
        rope = self._rope_rows(pos, ctx.end_frame * steps)
        for layer in self.layers:
            x = layer(x, rope, pos, ctx)
        x = self.norm(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x
