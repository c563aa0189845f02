"""The codec: causal convolutional encoder/decoder around the residual quantizer (spec §5–§8)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CodecConfig, TransformerArgs
from .context import LeftContext
from .layers import (CausalConv1d, CausalConvTranspose1d, Chain, ResidualUnit, Snake, causal_input, channels_last,
                     residual)
from .quantizer import Quantizer, VQStage
from .transformer import WindowedTransformer

# The encoder transformer's window, hard-coded in the reference's EncoderBlock.
ENCODER_WINDOW = 512


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int, n_layer: int, general: TransformerArgs | None) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualUnit(dim // 2, d) for d in (1, 3, 9)]
        layers += [Snake(dim // 2), CausalConv1d(dim // 2, dim, 2 * stride, stride=stride)]
        if n_layer:
            # EncoderBlock fixes these four fields whatever the general config says.
            args = TransformerArgs(
                **{**vars(general), "n_layer": n_layer, "n_head": dim // 64, "dim": dim, "intermediate_size": 3 * dim}
            )
            layers.append(WindowedTransformer(args, dim, ENCODER_WINDOW))
        self.block = Chain(layers)

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        return self.block(x, ctx)


class Encoder(nn.Module):
    """``encoder.block.*``: audio ``[B, L, 1]`` → latent ``[B, L / hop, latent]`` (time-major)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.encoder_dim
        layers: list[nn.Module] = [CausalConv1d(1, dim, 7)]
        for stride, n_layer in zip(cfg.encoder_rates, cfg.encoder_transformer_layers):
            dim *= 2
            layers.append(EncoderBlock(dim, stride, n_layer, cfg.transformer_general_config))
        layers += [Snake(dim), CausalConv1d(dim, cfg.latent, 3)]
        self.block = Chain(layers)

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        return self.block(x, ctx)


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.block = Chain(
            [Snake(c_in), CausalConvTranspose1d(c_in, c_out, 2 * stride, stride, weight_norm=True)]
            + [ResidualUnit(c_out, d) for d in (1, 3, 9)]
        )

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        return self.block(x, ctx)


class Decoder(nn.Module):
    """``decoder.model.*``: latent ``[B, 4T, latent]`` → audio ``[B, T · frame_length, 1]`` in (−1, 1)."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(cfg.latent, dim, 7)]
        for stride in cfg.decoder_rates:
            layers.append(DecoderBlock(dim, dim // 2, stride))
            dim //= 2
        layers += [Snake(dim), CausalConv1d(dim, 1, 7)]
        # Index 7 of the reference's list is the final tanh, which has no weights.
        self.model = Chain(layers)

    def forward(self, x: Tensor, ctx: LeftContext) -> Tensor:
        return torch.tanh(self.model(x, ctx))


class Codec(nn.Module):
    """Encode 44.1 kHz mono audio to codes ``[B, N, T]`` and decode them (offline here;
    incrementally, many streams at once, with :class:`~s1_mini.codec.streams.CodecStreams`).

    Built in float32; :meth:`set_precision` moves the conv and linear weights to bf16 or
    fp16, while Snake, norms, softmax, RoPE and the VQ stay float32 (spec §9). Inside,
    activations are time-major (``[B, L, C]``, see :mod:`.layers`).
    """

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.dtype = torch.float32
        self.encoder = Encoder(config)
        self.quantizer = Quantizer(config.quantizer)
        self.decoder = Decoder(config)

    @classmethod
    def from_checkpoint(
        cls, checkpoint_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Codec":
        """Load ``codec.pth`` (and ``codec_config.json`` if present) from a checkpoint directory.

        Strict, unlike the reference: missing keys, unexpected keys and wrong shapes are
        refused with a :class:`~s1_mini.checkpoint.CheckpointError` naming them.
        """
        from .loading import load_codec

        return load_codec(Path(checkpoint_dir), torch.device(device), dtype)

    def set_precision(self, dtype: torch.dtype) -> "Codec":
        """Cast the conv/linear weights (GEMMs) to ``dtype``, everything else stays float32;
        lay the causal convs' weights out channels-last, as their convs read them."""
        self.dtype = dtype
        vq = {id(m) for stage in self.modules() if isinstance(stage, VQStage) for m in stage.modules()}
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)) and id(module) not in vq:
                module.to(dtype)
            if isinstance(module, (CausalConv1d, CausalConvTranspose1d)):
                module.conv.weight.data = channels_last(module.conv.weight.data)
        return self

    @property
    def device(self) -> torch.device:
        return self.quantizer.semantic_quantizer.quantizers[0].codebook.weight.device

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """Audio ``[B, L]`` float at 44.1 kHz → codes ``[B, N, ceil(L / frame_length)]`` int64.

        The audio is right-padded with zeros to whole frames, as in the reference.
        """
        if audio.dim() != 2 or audio.shape[1] == 0:
            raise ValueError(f"expected audio [batch, samples] with samples > 0, got {list(audio.shape)}")
        frames = -(-audio.shape[1] // self.config.frame_length)
        x = F.pad(audio.to(self.device, self.dtype), (0, frames * self.config.frame_length - audio.shape[1]))
        ctx = LeftContext(x.shape[0], frames, self.device)
        return self.quantizer.encode(self.encoder(x[..., None], ctx), ctx)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``[B, N, T]`` → audio ``[B, T · frame_length]`` float32.

        Codes above a codebook's size are clamped to its last entry, as in the reference.
        """
        codes = self._check_codes(codes, batched=True)
        if codes.shape[2] == 0:
            return torch.zeros(codes.shape[0], 0, device=self.device)
        ctx = LeftContext(codes.shape[0], codes.shape[2], self.device)
        return self._decode(codes, ctx)

    @torch.inference_mode()
    def decode_batch(self, codes: list[Tensor]) -> list[Tensor]:
        """Several code sequences ``[N, T_i]`` → audio ``[T_i · frame_length]`` each, in one batch.

        Right-padded to the longest and cropped: decode is causal, so each result is the
        one it would have alone.
        """
        codes = [self._check_codes(c, batched=False) for c in codes]
        lengths = [c.shape[1] for c in codes]
        if max(lengths, default=0) == 0:
            return [torch.zeros(0, device=self.device) for _ in codes]
        padded = torch.stack([F.pad(c, (0, max(lengths) - n)) for c, n in zip(codes, lengths)])
        ctx = LeftContext(len(codes), max(lengths), self.device)
        audio = self._decode(padded, ctx)
        return [a[: n * self.config.frame_length] for a, n in zip(audio, lengths)]

    def compile_pointwise(self, wrap: Callable[[Callable], Callable]) -> None:
        """Run the element-wise passes between the convs through ``wrap`` (e.g.
        torch.compile, dynamic shapes): every causal conv's input pass (bias, Snake, left
        context, padding: ``causal_input``) and every residual unit's sum (``residual``),
        one pass over the activations each instead of up to ten and a copy."""
        # Dynamic shapes still recompile for new strides (a phased conv's cropped output),
        # 0/1 sizes and absent arguments: more compiles than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        input_pass, residual_pass = wrap(causal_input), wrap(residual)
        for module in self.modules():
            if isinstance(module, (CausalConv1d, CausalConvTranspose1d)):
                module.input_pass = input_pass
            if isinstance(module, ResidualUnit):
                module.residual = residual_pass

    def _decode(self, codes: Tensor, ctx: LeftContext) -> Tensor:
        z = self.quantizer.decode(codes, ctx, self.dtype)
        return self.decoder(z, ctx)[..., 0].float()

    def _check_codes(self, codes: Tensor, batched: bool) -> Tensor:
        n = self.config.num_codebooks
        shape = "[B, N, T]" if batched else "[N, T]"
        if codes.dim() != (3 if batched else 2) or codes.shape[-2] != n:
            raise ValueError(f"expected codes {shape} with N = {n}, got {list(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and int(codes.min()) < 0:
            raise ValueError("codes must be non-negative")
        return codes.to(self.device, torch.long)

