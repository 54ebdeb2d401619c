"""Latent codecs: images (uint8, N x H x W x C) <-> the space the EqM network descends in.

- ``SDVAECodec``: the Stable Diffusion VAE (``stabilityai/sd-vae-ft-ema``) through diffusers, loaded
  from a local folder only (no network at run time); latents are scaled by 0.18215, 256 px <-> 4x32x32.
- ``IdentityCodec``: pixel-space models; pixels in [0, 255] <-> values in [-1, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SD_VAE_SCALE = 0.18215


# Approximate RGB of an SD-VAE latent cell: a linear least-squares fit of decoded colour on the 4 scaled
# latent channels (the coefficients image UIs use for their cheap previews); rows = latent channels.
SD_LATENT_TO_RGB = torch.tensor([[0.298, 0.207, 0.208],
                                 [0.187, 0.286, 0.173],
                                 [-0.158, 0.189, 0.264],
                                 [-0.184, -0.271, -0.473]])


class CodecError(Exception):
    """The codec could not be loaded or the input does not fit it (one-line message)."""


class IdentityCodec:
    """Pixel-space models: the "latent" is the image itself scaled to [-1, 1]."""

    name = "identity"

    def __init__(self, channels: int, size: int):
        self.channels, self.size = channels, size
        self.image_size = size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
        images = _check_images(images, self.size, self.channels)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) -> (N, H, W, C) uint8."""
        return self.decode_tensor(latents.detach().cpu()).numpy()

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode`` without leaving the latents' device: (N, H, W, C) uint8 where ``latents`` are."""
        x = (latents.detach().float() + 1.0) * 127.5
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def preview_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """A live preview of an iterate: in pixel space it is the image itself."""
        return self.decode_tensor(latents)


class SDVAECodec:
    """Stable Diffusion VAE from a local diffusers folder (``config.json`` + weights)."""

    name = "sd-vae"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CodecError(f"{folder}: no VAE there (expected a diffusers AutoencoderKL folder with config.json); "
                             "download stabilityai/sd-vae-ft-ema once and pass its folder with --vae")
        from diffusers.models import AutoencoderKL  # heavy import: only when a VAE is used
        try:
            self.vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise CodecError(f"{folder}: could not load the VAE ({str(exc).splitlines()[0]})") from None
        self.vae = self.vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        self.image_size = int(self.vae.config.sample_size)

    def latent_shape_for(self, image_size: int) -> tuple[int, int, int]:
        return (self.latent_channels, image_size // self.downsample, image_size // self.downsample)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 4, H/8, W/8) scaled latents (the posterior mean: deterministic)."""
        images = _check_images(images, None, 3)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return (dist.mean * SD_VAE_SCALE).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(N, 4, h, w) scaled latents -> (N, 8h, 8w, 3) uint8, as the official ``clamp(127.5*x + 128)``."""
        return self.decode_tensor(latents).cpu().numpy()

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode`` without the copy to the host: (N, 8h, 8w, 3) uint8 on the VAE's device."""
        x = self.vae.decode(latents.to(self.device, self.dtype) / SD_VAE_SCALE).sample
        return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    @torch.no_grad()
    def preview_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """A cheap approximate decode for live previews: ``SD_LATENT_TO_RGB`` maps the 4 scaled latent
        channels of each cell to RGB in [-1, 1], one pixel per latent cell (32x32 at 256 px); no VAE runs."""
        rgb = torch.einsum("nchw,cr->nrhw", latents.float(), SD_LATENT_TO_RGB.to(latents.device))
        return torch.clamp(127.5 * rgb + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _check_images(images: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise CodecError("images must be a uint8 array of shape (N, H, W, C)")
    if images.shape[-1] != channels:
        raise CodecError(f"images have {images.shape[-1]} channels, the model expects {channels}")
    if size is not None and images.shape[1:3] != (size, size):
        raise CodecError(f"images are {images.shape[2]}x{images.shape[1]}, the model expects {size}x{size}")
    return images


def make_codec(kind: str, *, channels: int, latent_size: int, vae_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The codec a model spec names; ``sd-vae`` needs ``vae_dir``."""
    if kind == "identity":
        return IdentityCodec(channels, latent_size)
    if kind == "sd-vae":
        if vae_dir is None:
            raise CodecError("this model works in SD-VAE latents: pass the VAE folder (--vae DIR or EQM_VAE)")
        return SDVAECodec(vae_dir, device=device, dtype=dtype)
    raise CodecError(f"unknown codec {kind!r}")
