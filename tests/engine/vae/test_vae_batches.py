"""A VAE batch on the CPU backend runs image by image (batch-1 programs, side by side on host threads):
the same pixels and latents as one image at a time, whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2

from flowgen.engine.vae.model import load_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                               latent_channels=8).eval()
    folder = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(folder)
    return load_vae(folder)


def test_a_batch_decodes_and_encodes_image_by_image(vae, monkeypatch):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, vae.config.token_channels, 2, 3)).astype(np.float32)
    images = np.tanh(rng.standard_normal((3, 32, 48, 3))).astype(np.float32)
    alone = [np.asarray(vae.decode(z[i : i + 1])) for i in range(3)], [np.asarray(vae.encode(images[i : i + 1])) for i in range(3)]

    batches = []
    for name in ("decode_float_fn", "encode_fn"):
        fn = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda params, x, fn=fn: batches.append(x.shape[0]) or fn(params, x))
    decoded, encoded = np.asarray(vae.decode(z)), np.asarray(vae.encode(images))

    assert batches == [1] * 6  # batch-1 programs only
    np.testing.assert_array_equal(decoded, np.concatenate(alone[0]))
    np.testing.assert_array_equal(encoded, np.concatenate(alone[1]))
