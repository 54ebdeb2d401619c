"""Latent codecs: SD-VAE through diffusers from a local folder (tiny random weights), identity codec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.codecs import SD_VAE_SCALE, CodecError, IdentityCodec, SDVAECodec, make_codec


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def test_vae_roundtrip_shapes_scale_and_decode_formula(vae_dir):
    codec = SDVAECodec(vae_dir)
    assert codec.latent_shape_for(32) == (4, 16, 16)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    latents = codec.encode(images)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    # Encoding is the scaled posterior mean: deterministic, and 0.18215 times the raw mean.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = codec.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(latents, raw * SD_VAE_SCALE)
    decoded = codec.decode(latents)
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == np.uint8
    with torch.no_grad():
        pixels = codec.vae.decode(latents / SD_VAE_SCALE).sample
    expect = torch.clamp(127.5 * pixels + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(decoded, expect)


def test_missing_vae_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CodecError, match="no VAE there"):
        SDVAECodec(tmp_path / "sd-vae-ft-ema")
    with pytest.raises(CodecError, match="pass the VAE folder"):
        make_codec("sd-vae", channels=4, latent_size=32)


def test_identity_codec_roundtrip_and_checks():
    codec = IdentityCodec(channels=1, size=8)
    images = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) * 4
    x = codec.encode(images)
    assert x.shape == (1, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(codec.decode(x), images)
    with pytest.raises(CodecError, match="the model expects 8x8"):
        codec.encode(np.zeros((1, 16, 16, 1), np.uint8))
    with pytest.raises(CodecError, match="expects 1"):
        codec.encode(np.zeros((1, 8, 8, 3), np.uint8))
