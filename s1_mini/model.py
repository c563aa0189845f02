"""The S1-mini Dual-AR text-to-semantic transformer, in plain PyTorch.

A "slow" decoder-only transformer reads, per position, a token embedding plus the
sum of N codebook embeddings and predicts the next token over the whole vocabulary.
A small "fast" transformer then runs over N positions per audio frame to predict
codebooks 1..N-1 of that frame. Spec: ``shared/spec/text2semantic.md`` §2-§4.

Every step takes a batch of sequences, each with its own absolute positions and its
own KV-cache slot, so continuous batching only has to choose which slots run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s1_mini.checkpoint import CheckpointError, check_keys_and_shapes, read_state_dict
from s1_mini.rope import apply_rope, rope_table
from s1_mini.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The fast model only ever samples residual codebooks, which have 1024 entries in the
# S1 codec; the reference cuts the fast logits to this many entries (spec §5.3).
FAST_LOGIT_LIMIT = 1024


# --------------------------------------------------------------------------- config


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class ModelConfig:
    """`config.json` of a dual-AR checkpoint, with the derived values resolved (§2)."""

    model_type: str = "dual_ar"
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None
    n_local_heads: int = -1
    head_dim: int | None = 64
    rope_base: float = 10000
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    attention_qkv_bias: bool = False
    attention_o_bias: bool = False
    attention_qk_norm: bool = False
    codebook_size: int = 160
    num_codebooks: int = 4
    use_gradient_checkpointing: bool = True
    initializer_range: float = 0.02
    is_reward_model: bool = False
    scale_codebook_embeddings: bool = False
    n_fast_layer: int = 4
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    fast_attention_qkv_bias: bool | None = None
    fast_attention_qk_norm: bool | None = None
    fast_attention_o_bias: bool | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown}")
        model_type = raw.get("model_type", "base")
        if model_type != "dual_ar":
            raise CheckpointError(
                f"{source}: model_type must be 'dual_ar' for S1 checkpoints, got {model_type!r}"
            )
        c = dict(raw)
        # Derived values in the reference's order (§2.3). The integer fallbacks use
        # truthiness (0 falls back too); the boolean ones only trigger on null.
        if c.get("n_local_heads", -1) == -1:
            c["n_local_heads"] = c.get("n_head", cls.n_head)
        dim = c.get("dim", cls.dim)
        if c.get("intermediate_size") is None:
            c["intermediate_size"] = _round_up(int(2 * (4 * dim) / 3), 256)
        if "head_dim" in c and c["head_dim"] is None:
            c["head_dim"] = dim // c.get("n_head", cls.n_head)
        for fast, slow in [
            ("fast_dim", "dim"),
            ("fast_n_head", "n_head"),
            ("fast_n_local_heads", "n_local_heads"),
            ("fast_head_dim", "head_dim"),
            ("fast_intermediate_size", "intermediate_size"),
        ]:
            c[fast] = c.get(fast) or c.get(slow, getattr(cls, slow))
        for flag in ["attention_qkv_bias", "attention_qk_norm", "attention_o_bias"]:
            if c.get("fast_" + flag) is None:
                c["fast_" + flag] = c.get(flag, getattr(cls, flag))
        config = cls(**c)
        config._validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    def _validate(self, source: str) -> None:
        def need(ok: bool, rule: str) -> None:
            if not ok:
                raise CheckpointError(f"{source}: {rule}")

        for name in ["vocab_size", "n_layer", "n_head", "dim", "head_dim", "intermediate_size",
                     "n_local_heads", "codebook_size", "num_codebooks", "max_seq_len",
                     "n_fast_layer", "fast_dim", "fast_n_head", "fast_n_local_heads",
                     "fast_head_dim", "fast_intermediate_size"]:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.dim % self.n_head == 0, "dim must be divisible by n_head")
        need(self.n_head % self.n_local_heads == 0, "n_head must be divisible by n_local_heads")
        need(self.fast_dim % self.fast_n_head == 0, "fast_dim must be divisible by fast_n_head")
        need(self.fast_n_head % self.fast_n_local_heads == 0,
             "fast_n_head must be divisible by fast_n_local_heads")
        need(self.head_dim % 2 == 0 and self.fast_head_dim % 2 == 0,
             "head_dim and fast_head_dim must be even (RoPE rotates pairs)")
        need(self.num_codebooks <= self.max_seq_len, "num_codebooks must be <= max_seq_len")
        need(not self.is_reward_model, "is_reward_model must be false (no reward head at inference)")
        need(self.norm_eps > 0, "norm_eps must be > 0")

    @property
    def fast_logit_size(self) -> int:
        return min(self.codebook_size, FAST_LOGIT_LIMIT)


# ----------------------------------------------------------------------- numerics


class RMSNorm(nn.Module):
    """Block/final norm: normalize in float32, round to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class HeadNorm(nn.Module):
    """q/k norm: PyTorch's built-in RMSNorm (fused normalize and scale), as the
    reference uses ``nn.RMSNorm`` there (§4.5)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# --------------------------------------------------------------------------- layers


def project(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``. Compiled, a one-row input (a single stream's
    decode step) is projected as a broadcast multiply and a sum over the input dim in
    float32 (as a GEMM accumulates): inductor then emits its own reduction kernels,
    which read the weight once and take neighbouring pointwise work with them (11
    kernels a block instead of 15). cuBLAS's one-row GEMVs of these shapes reached a
    third of an H200's bandwidth: a block took 48 us against 35
    (bench/block_variants.py). Eager, and for several rows, it stays a GEMM."""
    if x.numel() != x.shape[-1] or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = (x.float()[..., None, :] * weight.float()).sum(-1).to(x.dtype)
    return y if bias is None else y + bias


@dataclass(frozen=True)
class StackShape:
    """The shape of one transformer stack (slow or fast)."""

    dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    eps: float


def stack_shapes(c: ModelConfig) -> tuple[StackShape, StackShape]:
    """The slow and the fast stack's shapes; the fast one uses the ``fast_*`` values
    and inherits everything else (§2.3)."""
    slow = StackShape(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size,
                      c.attention_qkv_bias, c.attention_o_bias, c.attention_qk_norm, c.norm_eps)
    fast = StackShape(c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim,
                      c.fast_intermediate_size, c.fast_attention_qkv_bias,
                      c.fast_attention_o_bias, c.fast_attention_qk_norm, c.norm_eps)
    return slow, fast


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, grouped: bool) -> Tensor:
    """Attention of ``q [B, H, T, d]`` over ``keys, values [B, H_kv, L, d]`` under ``mask
    [B, 1, T, L]`` (True = visible); ``grouped``: ``H_kv < H``, heads share K/V in groups
    (a Python bool from the stack's shape, not from tensor sizes, which are symbolic
    when traced with dynamic shapes)."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=grouped)


class Attention(nn.Module):
    def __init__(self, s: StackShape) -> None:
        super().__init__()
        self.s = s
        self.wqkv = nn.Linear(s.dim, (s.n_head + 2 * s.n_kv_head) * s.head_dim, bias=s.qkv_bias)
        self.wo = nn.Linear(s.n_head * s.head_dim, s.dim, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = HeadNorm(s.head_dim, s.eps)
            self.k_norm = HeadNorm(s.head_dim, s.eps)

    def forward(self, x: Tensor, rope: Tensor, cache: "KVCache", slots: Tensor | None,
                pos: Tensor, mask: Tensor) -> Tensor:
        """x ``[B, T, dim]``; writes K/V at ``cache[slots, :, pos]`` and attends to the
        cache's first ``L`` positions under ``mask [B, 1, T, L]`` (True = visible)."""
        s = self.s
        B, T, _ = x.shape
        q, k, v = project(x, self.wqkv.weight, self.wqkv.bias).split(
            [s.n_head * s.head_dim, s.n_kv_head * s.head_dim, s.n_kv_head * s.head_dim], dim=-1)
        q = q.view(B, T, s.n_head, s.head_dim)
        k = k.view(B, T, s.n_kv_head, s.head_dim)
        v = v.view(B, T, s.n_kv_head, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        keys, values = cache.write(slots, pos, k, v, mask.shape[-1])
        out = attend(q.transpose(1, 2), keys, values, mask, s.n_kv_head != s.n_head)
        return project(out.transpose(1, 2).reshape(B, T, s.n_head * s.head_dim), self.wo.weight, self.wo.bias)


class FeedForward(nn.Module):
    def __init__(self, s: StackShape) -> None:
        super().__init__()
        self.w1 = nn.Linear(s.dim, s.intermediate_size, bias=False)
        self.w3 = nn.Linear(s.dim, s.intermediate_size, bias=False)
        self.w2 = nn.Linear(s.intermediate_size, s.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return project(F.silu(project(x, self.w1.weight)) * project(x, self.w3.weight), self.w2.weight)


class Block(nn.Module):
    def __init__(self, s: StackShape) -> None:
        super().__init__()
        self.attention = Attention(s)
        self.feed_forward = FeedForward(s)
        self.ffn_norm = RMSNorm(s.dim, s.eps)
        self.attention_norm = RMSNorm(s.dim, s.eps)

    def forward(self, x: Tensor, rope: Tensor, cache: "KVCache", slots: Tensor | None,
                pos: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, slots, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def run_block(layer: Block, x: Tensor, rope: Tensor, cache: "KVCache", slots: Tensor | None,
              pos: Tensor, mask: Tensor) -> Tensor:
    return layer(x, rope, cache, slots, pos, mask)


BlockFn = Callable[[Block, Tensor, Tensor, "KVCache", "Tensor | None", Tensor, Tensor], Tensor]


def run_head(norm: RMSNorm, x: Tensor, weight: Tensor) -> Tensor:
    """Logits of ``x``: the final norm, then the output projection (compiled by the
    runner, like ``run_block``, for the fast stack's nine heads a frame)."""
    return project(norm(x), weight)


HeadFn = Callable[[RMSNorm, Tensor, Tensor], Tensor]


class KVCache:
    """Static K/V storage ``[slots, kv_heads, length, head_dim]`` for one layer.

    Slots past a sequence's current position may hold stale values from an earlier
    request; the mask never lets a query see them, so nothing is cleared (§4.8).
    """

    def __init__(self, slots: int, n_kv_head: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, n_kv_head, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, slots: Tensor | None, pos: Tensor, k: Tensor, v: Tensor,
              length: int) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, T, H, d]`` at ``(slots[b], pos[b, t])``; return the first
        ``length`` positions of the batch's slots ``[B, H, length, d]``. ``slots=None``
        means slots ``0..B-1``, which returns views instead of gathered copies."""
        B = pos.shape[0]
        if slots is None:
            # Index the whole cache, not a slice of it: compiled, a write through the
            # slice view copied the slice (every slot's cache in the batch) each layer.
            rows = torch.arange(B, device=pos.device)[:, None].expand_as(pos)
            self.k[rows, :, pos] = k
            self.v[rows, :, pos] = v
            return self.k[:B, :, :length], self.v[:B, :, :length]
        rows = slots[:, None].expand_as(pos)
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v
        return self.k[slots, :, :length], self.v[slots, :, :length]


# ---------------------------------------------------------------------------- model


@dataclass
class SlowOutput:
    logits: Tensor  # [B, V] at each sequence's last input position
    fast_input: Tensor  # [B, fast_dim]: fast_project_in of the pre-norm hidden state


class DualARTransformer(nn.Module):
    """Slow + fast transformers with state-dict keys exactly as the official layout."""

    def __init__(self, config: ModelConfig, semantic_begin_id: int, semantic_end_id: int) -> None:
        super().__init__()
        self.config = c = config
        self.semantic_begin_id = semantic_begin_id
        self.semantic_end_id = semantic_end_id
        self.slow_shape, self.fast_shape = slow, fast = stack_shapes(c)

        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(Block(slow) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_word_embeddings:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.fast_dim != c.dim:
            self.fast_project_in = nn.Linear(c.dim, c.fast_dim, bias=True)
        else:
            self.fast_project_in = nn.Identity()
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(Block(fast) for _ in range(c.n_fast_layer))
        self.fast_norm = RMSNorm(c.fast_dim, c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)

        self.register_buffer("freqs_cis", rope_table(c.max_seq_len, c.head_dim, c.rope_base),
                             persistent=False)
        self.register_buffer("fast_freqs_cis",
                             rope_table(c.num_codebooks, c.fast_head_dim, c.rope_base),
                             persistent=False)
        self.register_buffer("codebook_offsets",
                             torch.arange(c.num_codebooks) * c.codebook_size, persistent=False)
        self.slow_caches: list[KVCache] = []
        self.fast_caches: list[KVCache] = []
        self.fast_steps: list[tuple[Tensor, Tensor, Tensor]] = []

    # -- caches ----------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.slow_caches[0].k.shape[0] if self.slow_caches else 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate the KV caches: ``max_batch_size`` slots of ``max_seq_len`` positions
        (default: the config's) in the model's dtype and device."""
        length = max_seq_len or self.config.max_seq_len
        if length > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {length} exceeds the model's {self.config.max_seq_len}")
        w = self.embeddings.weight
        s, f = self.slow_shape, self.fast_shape
        self.slow_caches = [KVCache(max_batch_size, s.n_kv_head, length, s.head_dim, w.dtype, w.device)
                            for _ in self.layers]
        n = self.config.num_codebooks
        self.fast_caches = [KVCache(max_batch_size, f.n_kv_head, n, f.head_dim, w.dtype, w.device)
                            for _ in self.fast_layers]
        # Per fast position: its index [1, 1], causal mask [1, 1, 1, N] and RoPE row
        # [1, 1, d/2, 2], made once (each its own tensor, so every view a step takes is
        # aligned): a step expands them instead of building them (4 kernels a position).
        self.fast_steps = [(torch.full((1, 1), k, device=w.device),
                            (torch.arange(n, device=w.device) <= k).view(1, 1, 1, n),
                            self.fast_freqs_cis[k].view(1, 1, *self.fast_freqs_cis.shape[1:]).clone())
                           for k in range(n)]

    # -- slow model --------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """``tokens [B, N+1, T]`` (row 0 token ids, rows 1..N codes) → ``[B, T, dim]`` (§4.2)."""
        c = self.config
        ids = tokens[:, 0]
        codes = tokens[:, 1:] + self.codebook_offsets[None, :, None]
        semantic = (ids >= self.semantic_begin_id) & (ids <= self.semantic_end_id)
        # stack + sum, so that in bf16 the sum is accumulated in float32 and rounded once
        cb = self.codebook_embeddings(codes).sum(dim=1)
        x = self.embeddings(ids) + cb * semantic[..., None]
        if c.scale_codebook_embeddings:
            x = torch.where(semantic[..., None], x / math.sqrt(c.num_codebooks + 1), x)
        return x

    def forward_slow(self, tokens: Tensor, pos: Tensor, slots: Tensor | None = None,
                     all_positions: bool = False, block: BlockFn = run_block,
                     at: Tensor | None = None, kv_len: int | None = None) -> SlowOutput:
        """Run the slow stack over ``tokens [B, N+1, T]`` at absolute positions
        ``pos [B, T]`` in cache ``slots [B]`` (None: slots 0..B-1); return the last
        position's logits and fast input (§4.7), or those of position ``at [B]`` (a
        prompt padded at its end), or every position's with ``all_positions`` (for
        tests). Prefill is T = prompt length, a decode step T = 1.
        Every layer runs through ``block`` (a compiled ``run_block``: one compile serves
        all layers). Attention reads the caches' first ``kv_len`` positions (default:
        all), which must cover every ``pos``: a decode step's cost grows with it."""
        kv_len = kv_len or self.slow_caches[0].k.shape[2]
        mask = (torch.arange(kv_len, device=pos.device)[None, None, :] <= pos[:, :, None])[:, None]
        # The length varies from step to step: dynamic, so that one compile of the block
        # (static in everything else) serves every length.
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        rope = self.freqs_cis[pos]
        x = self.embed(tokens)
        for layer, cache in zip(self.layers, self.slow_caches):
            x = block(layer, x, rope, cache, slots, pos, mask)
        if all_positions:
            z = x
        elif at is None:
            z = x[:, -1]
        else:
            z = x[torch.arange(x.shape[0], device=x.device), at]
        head = self.embeddings.weight if self.config.tie_word_embeddings else self.output.weight
        return SlowOutput(logits=F.linear(self.norm(z), head), fast_input=self.fast_project_in(z))

    # -- fast model --------------------------------------------------------------

    def forward_fast(self, x: Tensor, position: int, slots: Tensor | None = None,
                     logits: bool = True, block: BlockFn = run_block, head: HeadFn = run_head) -> Tensor | None:
        """One fast position for a batch: ``x [B, fast_dim]`` at fast position
        ``position`` → logits ``[B, fast_logit_size]`` (§4.9). The position-0 logits
        are discarded by the reference, so callers pass ``logits=False`` there."""
        B = x.shape[0]
        pos, mask, rope = self.fast_steps[position]
        pos, rope = pos.expand(B, 1), rope.expand(B, *rope.shape[1:])
        h = x[:, None]
        for layer, cache in zip(self.fast_layers, self.fast_caches):
            h = block(layer, h, rope, cache, slots, pos, mask)
        if not logits:
            return None
        return head(self.fast_norm, h[:, 0], self.fast_output.weight[: self.config.fast_logit_size])


# -------------------------------------------------------------------------- loading


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the official layout with its shape (§3.1)."""
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.weight": (c.vocab_size, c.dim),
        "codebook_embeddings.weight": (c.codebook_size * c.num_codebooks, c.dim),
    }

    def stack(prefix: str, n: int, s: StackShape) -> None:
        qkv = (s.n_head + 2 * s.n_kv_head) * s.head_dim
        for i in range(n):
            p = f"{prefix}.{i}."
            shapes[p + "attention.wqkv.weight"] = (qkv, s.dim)
            if s.qkv_bias:
                shapes[p + "attention.wqkv.bias"] = (qkv,)
            shapes[p + "attention.wo.weight"] = (s.dim, s.n_head * s.head_dim)
            if s.o_bias:
                shapes[p + "attention.wo.bias"] = (s.dim,)
            if s.qk_norm:
                shapes[p + "attention.q_norm.weight"] = (s.head_dim,)
                shapes[p + "attention.k_norm.weight"] = (s.head_dim,)
            shapes[p + "feed_forward.w1.weight"] = (s.intermediate_size, s.dim)
            shapes[p + "feed_forward.w3.weight"] = (s.intermediate_size, s.dim)
            shapes[p + "feed_forward.w2.weight"] = (s.dim, s.intermediate_size)
            shapes[p + "ffn_norm.weight"] = (s.dim,)
            shapes[p + "attention_norm.weight"] = (s.dim,)

    slow, fast = stack_shapes(c)
    stack("layers", c.n_layer, slow)
    shapes["norm.weight"] = (c.dim,)
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    if c.fast_dim != c.dim:
        shapes["fast_project_in.weight"] = (c.fast_dim, c.dim)
        shapes["fast_project_in.bias"] = (c.fast_dim,)
    shapes["fast_embeddings.weight"] = (c.codebook_size, c.fast_dim)
    stack("fast_layers", c.n_fast_layer, fast)
    shapes["fast_norm.weight"] = (c.fast_dim,)
    shapes["fast_output.weight"] = (c.codebook_size, c.fast_dim)
    return shapes


def normalize_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply the reference loader's key rewrites (§1.3): ``model.`` removal decided by
    the first key, ``audio_`` keys dropped, separate wq/wk/wv merged into wqkv."""
    if state and next(iter(state)).startswith("model."):
        state = {k.replace("model.", ""): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if "audio_" not in k}
    for key in [k for k in state if k.endswith("attention.wq.weight")]:
        prefix = key[: -len("wq.weight")]
        parts = [state.pop(prefix + name + ".weight") for name in ("wq", "wk", "wv")]
        state[prefix + "wqkv.weight"] = torch.cat(parts, dim=0)
    return state


def load_weights(model: DualARTransformer, weights_path: str | Path) -> None:
    """Load ``model.pth`` into ``model`` (built on the meta device), refusing a missing
    key or a shape mismatch. Keys the reference ignores (KV caches, RoPE buffers,
    anything else unexpected) are dropped with a log line."""
    state = normalize_state_dict(read_state_dict(weights_path))
    if any(k.endswith(".scales") for k in state):
        raise CheckpointError(f"{weights_path}: weight-only int8/int4 checkpoints are not supported")
    expected = expected_shapes(model.config)
    check_keys_and_shapes(weights_path, state, expected)
    extra = sorted(set(state) - set(expected))
    if extra:
        log.info("%s: ignoring %d unexpected keys, e.g. %s", weights_path, len(extra), extra[:3])
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)


def build_model(config: ModelConfig, semantic_begin_id: int, semantic_end_id: int,
                weights_path: str | Path | None, device: str | torch.device,
                dtype: torch.dtype) -> DualARTransformer:
    """Construct the model, load its weights (or keep the §3.3 random init when
    ``weights_path`` is None, for tests) and move it to ``device``/``dtype``.

    The cast also converts the bf16-rounded RoPE tables, as in the reference (§1.2).
    """
    if weights_path is None:
        model = DualARTransformer(config, semantic_begin_id, semantic_end_id)
    else:
        with torch.device("meta"):
            model = DualARTransformer(config, semantic_begin_id, semantic_end_id)
        load_weights(model, weights_path)
        # buffers were created on meta; recompute them on the CPU
        model.freqs_cis = rope_table(config.max_seq_len, config.head_dim, config.rope_base)
        model.fast_freqs_cis = rope_table(config.num_codebooks, config.fast_head_dim, config.rope_base)
        model.codebook_offsets = torch.arange(config.num_codebooks) * config.codebook_size
    model = model.to(device=device, dtype=dtype)
    model.codebook_offsets = model.codebook_offsets.long()
    return model.eval().requires_grad_(False)


def load_text2semantic(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[DualARTransformer, Tokenizer]:
    """Load ``config.json``, the tokenizer and ``model.pth`` from a checkpoint directory."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    config = ModelConfig.from_file(d / "config.json")
    tokenizer = Tokenizer.from_dir(d)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{d}: the tokenizer defines {tokenizer.vocab_size} ids but config.json has "
            f"vocab_size {config.vocab_size}; every token id must be < vocab_size")
    model = build_model(config, tokenizer.semantic_begin_id, tokenizer.semantic_end_id,
                        d / "model.pth", device, dtype)
    return model, tokenizer
