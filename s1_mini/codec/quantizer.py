"""Downsampling residual vector quantizer (spec §6, §7).

Codes ``[B, 1 + n_codebooks, T]``: row 0 from the semantic codebook, rows 1.. from the
residual stages. The VQ stages (projections, codebooks, distances) always run in
float32: low-precision distances flip codes at near-ties (spec §9), and they cost
nothing next to the rest of the codec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig
from .context import LeftContext
from .layers import LEGACY, CausalConv1d, CausalConvTranspose1d, Chain, ConvNeXtBlock
from .transformer import WindowedTransformer


class VQStage(nn.Module):
    """One codebook: search among l2-normalised codes, reconstruct from the raw code."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, dim, 1)
        self.in_proj.wn_naming = self.out_proj.wn_naming = LEGACY
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """Residual ``[B, dim, T]`` → indices ``[B, T]`` and their reconstruction ``[B, dim, T]``."""
        z_e = self.in_proj(r)
        e = F.normalize(z_e.transpose(1, 2).flatten(0, 1))
        c = F.normalize(self.codebook.weight)
        # The expanded squared distance, first index on ties: the reference's form, so
        # that near-ties resolve the same way.
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        index = (-dist).argmax(1).view(r.shape[0], r.shape[2])
        # z_e + (z_q − z_e) rather than z_q: the reference's straight-through form, whose
        # rounding reaches the next stage's residual.
        z_q = self.codebook(index).transpose(1, 2)
        return index, self.out_proj(z_e + (z_q - z_e))

    def decode(self, index: Tensor) -> Tensor:
        """Indices ``[B, T]`` → ``[B, dim, T]`` from the raw (not normalised) codebook row."""
        return self.out_proj(self.codebook(index).transpose(1, 2))


class ResidualVQ(nn.Module):
    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(VQStage(dim, codebook_size, codebook_dim) for _ in range(n_codebooks))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Residual ``[B, dim, T]`` → indices ``[B, n, T]`` and the summed reconstruction."""
        indices, total = [], 0
        for stage in self.quantizers:
            index, out = stage.encode(z)
            z = z - out
            total = total + out
            indices.append(index)
        return torch.stack(indices, 1), total

    def decode(self, indices: Tensor) -> Tensor:
        z = 0
        for i, stage in enumerate(self.quantizers):
            z = z + stage.decode(indices[:, i])
        return z


class Quantizer(nn.Module):
    """``quantizer.*``: downsample ×4 → pre_module → VQ (encode); VQ → post_module → upsample (decode)."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        dims = (cfg.input_dim, *(cfg.downsample_dims or [cfg.input_dim] * len(cfg.downsample_factor)))
        self.semantic_quantizer = ResidualVQ(cfg.input_dim, 1, cfg.semantic_codebook_size, cfg.codebook_dim)
        self.quantizer = ResidualVQ(cfg.input_dim, cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim)
        self.downsample = nn.ModuleList(
            Chain([CausalConv1d(dims[i], dims[i + 1], f, stride=f, weight_norm=False), ConvNeXtBlock(dims[i + 1])])
            for i, f in enumerate(cfg.downsample_factor)
        )
        # upsample.0 mirrors the last downsample stage (spec §12.14).
        self.upsample = nn.ModuleList(
            Chain([CausalConvTranspose1d(dims[i + 1], dims[i], f, f, weight_norm=False), ConvNeXtBlock(dims[i])])
            for i, f in reversed(list(enumerate(cfg.downsample_factor)))
        )
        self.pre_module, self.post_module = (
            WindowedTransformer(t.config, t.input_dim, t.window_size) for t in (cfg.pre_module, cfg.post_module)
        )

    def encode(self, z: Tensor, ctx: LeftContext) -> Tensor:
        """Encoder output ``[B, 4T, C]`` (time-major) → codes ``[B, N, T]`` (int64).

        Unlike the reference, post_module and upsample are not run: their result is
        discarded there (spec §6.5).
        """
        for stage in self.downsample:
            z = stage(z, ctx)
        z = self.pre_module(z, ctx).float().transpose(1, 2)
        semantic, reconstruction = self.semantic_quantizer.encode(z)
        residual, _ = self.quantizer.encode(z - reconstruction)
        return torch.cat([semantic, residual], 1)

    def latent(self, codes: Tensor) -> Tensor:
        """Codes ``[B, N, T]`` → summed projected codes ``[B, C, T]`` in float32, clamped from above."""
        semantic = codes[:, :1].clamp(max=self.semantic_quantizer.codebook_size - 1)
        residual = codes[:, 1:].clamp(max=self.quantizer.codebook_size - 1)
        return self.quantizer.decode(residual) + self.semantic_quantizer.decode(semantic)

    def decode(self, codes: Tensor, ctx: LeftContext, dtype: torch.dtype) -> Tensor:
        """Codes ``[B, N, T]`` → the decoder's input ``[B, 4T, C]`` (time-major)."""
        z = self.post_module(self.latent(codes).transpose(1, 2).to(dtype), ctx)
        for stage in self.upsample:
            z = stage(z, ctx)
        return z
