"""The GFPGAN "clean" face restorer (Wang et al., CVPR 2021) in plain PyTorch.

A U-Net reads the degraded face; its bottleneck becomes the latent codes of a StyleGAN2 decoder,
and its up-sampling features modulate the decoder's features spatially (scale and shift on half
of the channels). Parameter names follow the published checkpoints (``GFPGANv1.4.pth``,
``params_ema``) so they load with ``strict=True``; ``tests/test_gfpgan.py`` checks the names,
the shapes and the output against the reference implementation's.

Noise is the decoder's stored noise, never fresh noise: a video's frames must not flicker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LEAK = 0.2


@dataclass(frozen=True)
class GFPGANConfig:
    out_size: int = 512
    style_features: int = 512
    channel_multiplier: int = 2
    mlp_layers: int = 8
    narrow: float = 1.0

    @property
    def levels(self) -> int:
        """log2 of the output size: the decoder grows from 4x4 to out_size in levels - 2 doublings."""
        return int(math.log2(self.out_size))

    def _width(self, resolution: int) -> float:
        wide = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}[resolution]
        return wide * (1 if resolution <= 32 else self.channel_multiplier) * self.narrow

    def decoder_channels(self, resolution: int) -> int:
        return int(self._width(resolution))

    def unet_channels(self, resolution: int) -> int:
        """The U-Net is half as wide as the decoder."""
        return int(self._width(resolution) * 0.5)


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResampleBlock(nn.Module):
    """Two 3x3 convolutions with a bilinear resize between them, and a resized 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, factor: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _resize(F.leaky_relu(self.conv1(x), LEAK), self.factor)
        out = F.leaky_relu(self.conv2(out), LEAK)
        return out + self.skip(_resize(x, self.factor))


class ModulatedConv(nn.Module):
    """StyleGAN2's convolution: per-sample weights scaled by the style, optionally demodulated."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, style_features: int, demodulate: bool, upsample: bool
    ) -> None:
        super().__init__()
        self.modulation = nn.Linear(style_features, in_channels)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel, kernel))
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        weight = self.weight * self.modulation(style).view(batch, 1, channels, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out_channels, kernel = weight.shape[1], weight.shape[-1]
        if self.upsample:
            x = _resize(x, 2.0)
        height, width = x.shape[2:]
        grouped = x.reshape(1, batch * channels, height, width)
        out = F.conv2d(
            grouped, weight.reshape(batch * out_channels, channels, kernel, kernel), padding=kernel // 2, groups=batch
        )
        return out.view(batch, out_channels, *out.shape[2:])


class StyleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, style_features: int, upsample: bool) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv(in_channels, out_channels, 3, style_features, True, upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2.0) + self.weight * noise + self.bias
        return F.leaky_relu(out, LEAK)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, style_features: int) -> None:
        super().__init__()
        self.modulated_conv = ModulatedConv(in_channels, 3, 1, style_features, demodulate=False, upsample=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        return out if skip is None else out + _resize(skip, 2.0)


class ConstantInput(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, 4, 4))


class Noises(nn.Module):
    """One fixed noise image per style convolution: 4x4, then two of each size up to out_size."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        for index in range(count):
            size = 2 ** ((index + 5) // 2)
            self.register_buffer(f"noise{index}", torch.randn(1, 1, size, size))

    def all(self) -> list[torch.Tensor]:
        return [getattr(self, f"noise{index}") for index in range(self.count)]


class StyleDecoder(nn.Module):
    """StyleGAN2's generator, its features modulated by the U-Net's (spatial feature transform)."""

    def __init__(self, config: GFPGANConfig) -> None:
        super().__init__()
        features = config.style_features
        # Kept for checkpoint compatibility: GFPGAN feeds latents directly, so the mapping MLP is unused.
        mapping: list[nn.Module] = [nn.Identity()]
        for _ in range(config.mlp_layers):
            mapping += [nn.Linear(features, features), nn.LeakyReLU(LEAK)]
        self.style_mlp = nn.Sequential(*mapping)
        start = config.decoder_channels(4)
        self.constant_input = ConstantInput(start)
        self.style_conv1 = StyleConv(start, start, features, upsample=False)
        self.to_rgb1 = ToRGB(start, features)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_channels = start
        for level in range(3, config.levels + 1):
            out_channels = config.decoder_channels(2**level)
            self.style_convs.append(StyleConv(in_channels, out_channels, features, upsample=True))
            self.style_convs.append(StyleConv(out_channels, out_channels, features, upsample=False))
            self.to_rgbs.append(ToRGB(out_channels, features))
            in_channels = out_channels
        self.noises = Noises(2 * (config.levels - 2) + 1)

    def forward(self, latents: torch.Tensor, conditions: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``latents``: (batch, 2 * levels - 2, style_features); one (scale, shift) per level."""
        noise = self.noises.all()
        out = self.constant_input.weight.repeat(latents.shape[0], 1, 1, 1)
        out = self.style_conv1(out, latents[:, 0], noise[0])
        image = self.to_rgb1(out, latents[:, 1], None)
        for level, (scale, shift) in enumerate(conditions):
            first = 2 * level + 1
            out = self.style_convs[2 * level](out, latents[:, first], noise[first])
            kept, modulated = out.chunk(2, dim=1)
            out = torch.cat([kept, modulated * scale + shift], dim=1)
            out = self.style_convs[2 * level + 1](out, latents[:, first + 1], noise[first + 1])
            image = self.to_rgbs[level](out, latents[:, first + 2], image)
        return image


def _condition(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(LEAK), nn.Conv2d(channels, channels, 3, 1, 1)
    )


class GFPGAN(nn.Module):
    """Face restoration: (batch, 3, out_size, out_size) RGB in [-1, 1] to the same."""

    def __init__(self, config: GFPGANConfig = GFPGANConfig()) -> None:
        super().__init__()
        self.config = config
        levels = config.levels
        self.conv_body_first = nn.Conv2d(3, config.unet_channels(2**levels), 1)
        self.conv_body_down = nn.ModuleList(
            ResampleBlock(config.unet_channels(2**level), config.unet_channels(2 ** (level - 1)), 0.5)
            for level in range(levels, 2, -1)
        )
        bottleneck = config.unet_channels(4)
        self.final_conv = nn.Conv2d(bottleneck, bottleneck, 3, 1, 1)
        self.conv_body_up = nn.ModuleList(
            ResampleBlock(config.unet_channels(2 ** (level - 1)), config.unet_channels(2**level), 2.0)
            for level in range(3, levels + 1)
        )
        # Intermediate RGB images supervise training only; kept for checkpoint compatibility.
        self.toRGB = nn.ModuleList(nn.Conv2d(config.unet_channels(2**level), 3, 1) for level in range(3, levels + 1))
        self.latent_count = 2 * levels - 2
        self.final_linear = nn.Linear(bottleneck * 16, self.latent_count * config.style_features)
        self.stylegan_decoder = StyleDecoder(config)
        self.condition_scale = nn.ModuleList(
            _condition(config.unet_channels(2**level)) for level in range(3, levels + 1)
        )
        self.condition_shift = nn.ModuleList(
            _condition(config.unet_channels(2**level)) for level in range(3, levels + 1)
        )

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        feature = F.leaky_relu(self.conv_body_first(faces), LEAK)
        skips = []
        for down in self.conv_body_down:
            feature = down(feature)
            skips.append(feature)
        feature = F.leaky_relu(self.final_conv(feature), LEAK)
        latents = self.final_linear(feature.flatten(1)).view(faces.shape[0], self.latent_count, -1)
        conditions = []
        for up, scale, shift, skip in zip(
            self.conv_body_up, self.condition_scale, self.condition_shift, reversed(skips), strict=True
        ):
            feature = up(feature + skip)
            conditions.append((scale(feature), shift(feature)))
        return self.stylegan_decoder(latents, conditions)
