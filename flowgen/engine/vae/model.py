"""The FLUX.2 autoencoder in JAX: images <-> the 128-channel normalised latents the DiT works on.

    vae = load_vae("…/FLUX.2-klein-9B/vae")        # or a pipeline root, or BFL ae.safetensors
    z = vae.encode(images)    # (B, H, W, 3) in [-1, 1]  -> (B, 128, H/16, W/16) float32
    u8 = vae.decode(z)        # (B, 128, h, w)            -> (B, 16h, 16w, 3) uint8 (on device)

Encode = encoder (+ quant_conv) -> posterior mean -> 2x2 patchify, channel order (c, pi, pj) ->
BatchNorm running-stat normalisation. Decode is the exact inverse followed by the decoder
(flux2_klein.md §7.1, diffusers `Flux2KleinPipeline._encode_vae_image` and its decode path).

The pure functions `encode_images`, `decode_latents` and `to_uint8` take `(params, x, config)` and
can be traced inside a caller's own jit; `encode_jit` / `decode_jit` / `decode_float_jit` are them
jitted with `config` static (it fixes the network's structure), and `VAE.encode_fn` / `decode_fn` /
`decode_float_fn` are those with the config bound: `vae.decode_fn(vae.params, z)`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine.runtime.host_threads import side_by_side
from flowgen.engine.vae import blocks
from flowgen.engine.vae.checkpoint import read_vae_checkpoint
from flowgen.engine.vae.config import VAEConfig
from flowgen.errors import ImageInputError

Params = blocks.Params


# ---------------------------------------------------------------------------------------------
# networks (NHWC)


def encoder(p: Params, x: jax.Array, config: VAEConfig) -> jax.Array:
    """Image (B, H, W, C_in) -> moments (B, H/8, W/8, 2 * latent_channels), without quant_conv."""
    g = config.norm_num_groups
    x = blocks.conv(p["conv_in"], x)
    for i in range(config.num_levels):
        level = p["down_blocks"][str(i)]
        for j in range(config.layers_per_block):
            x = blocks.resnet(level["resnets"][str(j)], x, g)
        if "downsamplers" in level:
            x = blocks.downsample(level["downsamplers"]["0"], x)
    x = blocks.mid_block(p["mid_block"], x, g)
    x = blocks.silu(blocks.group_norm(p["conv_norm_out"], x, g))
    return blocks.conv(p["conv_out"], x)


def decoder(p: Params, z: jax.Array, config: VAEConfig) -> jax.Array:
    """Latent (B, h, w, latent_channels) -> image (B, 8h, 8w, C_out), without post_quant_conv."""
    g = config.norm_num_groups
    x = blocks.conv(p["conv_in"], z)
    x = blocks.mid_block(p["mid_block"], x, g)
    for i in range(config.num_levels):  # deepest level first, as diffusers' up_blocks
        level = p["up_blocks"][str(i)]
        for j in range(config.layers_per_block + 1):
            x = blocks.resnet(level["resnets"][str(j)], x, g)
        if "upsamplers" in level:
            x = blocks.upsample(level["upsamplers"]["0"], x)
    x = blocks.silu(blocks.group_norm(p["conv_norm_out"], x, g))
    return blocks.conv(p["conv_out"], x)


# ---------------------------------------------------------------------------------------------
# latent layout: NHWC latents <-> patchified NCHW tokens grid


def patchify(z: jax.Array, patch: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, C*pi*pj, H/pi, W/pj); channel index = c*pi*pj + di*pj + dj."""
    b, h, w, c = z.shape
    pi, pj = patch
    z = z.reshape(b, h // pi, pi, w // pj, pj, c)
    z = z.transpose(0, 5, 2, 4, 1, 3)  # b, c, di, dj, i, j
    return z.reshape(b, c * pi * pj, h // pi, w // pj)


def unpatchify(z: jax.Array, patch: tuple[int, int]) -> jax.Array:
    """Inverse of `patchify`: (B, C*pi*pj, h, w) -> (B, h*pi, w*pj, C)."""
    b, cp, h, w = z.shape
    pi, pj = patch
    z = z.reshape(b, cp // (pi * pj), pi, pj, h, w)
    z = z.transpose(0, 4, 2, 5, 3, 1)  # b, i, di, j, dj, c
    return z.reshape(b, h * pi, w * pj, cp // (pi * pj))


def _bn_mean_std(p: Params, config: VAEConfig) -> tuple[jax.Array, jax.Array]:
    mean = p["bn"]["running_mean"].astype(jnp.float32)[None, :, None, None]
    std = jnp.sqrt(p["bn"]["running_var"].astype(jnp.float32) + config.batch_norm_eps)[None, :, None, None]
    return mean, std


# ---------------------------------------------------------------------------------------------
# pure entry points (trace these inside your own jit, or use VAE.encode_fn / decode_fn)


def encode_images(params: Params, images: jax.Array, config: VAEConfig) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> normalised latents (B, 128, H/16, W/16) float32."""
    return _encode(params, images, config)


def decode_latents(params: Params, z: jax.Array, config: VAEConfig) -> jax.Array:
    """Normalised latents (B, 128, h, w) -> raw decoder output (B, 16h, 16w, 3) float32, unclamped.

    The whole batch in one program: mapping image by image (lax.map) ran faster on CPU, but its
    rows then depended on the batch size (a loop of 2 trips and one of 3 or 4 round differently;
    tests/engine/test_pipeline.py::test_images_do_not_depend_on_batch_mates caught it)."""
    return _decode(params, z, config)


def _encode(params: Params, images: jax.Array, config: VAEConfig) -> jax.Array:
    dtype = params["encoder"]["conv_in"]["kernel"].dtype
    moments = encoder(params["encoder"], images.astype(dtype), config)
    if "quant_conv" in params:
        moments = blocks.conv(params["quant_conv"], moments)
    mean = moments[..., : config.latent_channels].astype(jnp.float32)  # posterior mean, no sampling
    tokens = patchify(mean, config.patch_size)
    bn_mean, bn_std = _bn_mean_std(params, config)
    return (tokens - bn_mean) / bn_std


def _decode(params: Params, z: jax.Array, config: VAEConfig) -> jax.Array:
    dtype = params["decoder"]["conv_in"]["kernel"].dtype
    bn_mean, bn_std = _bn_mean_std(params, config)
    latents = unpatchify(z.astype(jnp.float32) * bn_std + bn_mean, config.patch_size).astype(dtype)
    if "post_quant_conv" in params:
        latents = blocks.conv(params["post_quant_conv"], latents)
    return decoder(params["decoder"], latents, config).astype(jnp.float32)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 as round((clamp(x, -1, 1) + 1) * 127.5) (diffusers/BFL postprocess)."""
    x = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
    return jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)


def decode_to_uint8(params: Params, z: jax.Array, config: VAEConfig) -> jax.Array:
    """Normalised latents -> uint8 images (B, 16h, 16w, 3), all on device."""
    return to_uint8(decode_latents(params, z, config))


# One jit per entry point with the config static, so equal configs (e.g. the same weights loaded
# twice, or from BFL and diffusers files) share compiled executables.
encode_jit = jax.jit(encode_images, static_argnames=("config",))
decode_jit = jax.jit(decode_to_uint8, static_argnames=("config",))
decode_float_jit = jax.jit(decode_latents, static_argnames=("config",))
to_uint8_jit = jax.jit(to_uint8)


# ---------------------------------------------------------------------------------------------
# the object teammates hold


class VAE:
    """Loaded FLUX.2 autoencoder: params on device, config, and jitted encode/decode.

    Shapes are static under jit, so each new image size compiles once and is cached.
    """

    def __init__(self, params: Params, config: VAEConfig, dtype: jnp.dtype, source: str | Path = "<memory>"):
        self.params = params
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.source = str(source)
        # jitted (params, x) -> y with this config bound
        self.encode_fn = functools.partial(encode_jit, config=config)
        self.decode_fn = functools.partial(decode_jit, config=config)
        self.decode_float_fn = functools.partial(decode_float_jit, config=config)

    def encode(self, images: jax.Array | np.ndarray) -> jax.Array:
        """(B, H, W, 3) float in [-1, 1], H and W multiples of 16 -> (B, 128, H/16, W/16) float32.

        On the CPU backend the images of a batch are encoded one per host thread (runtime/host_threads.py)."""
        self._check_images(images)
        return _by_image(lambda x: self.encode_fn(self.params, x), images)

    def decode(self, z: jax.Array | np.ndarray) -> jax.Array:
        """(B, 128, h, w) normalised latents -> (B, 16h, 16w, 3) uint8, quantised on device.

        On the CPU backend the images of a batch are decoded one per host thread (runtime/host_threads.py)."""
        self._check_latents(z)
        # decoder and quantisation as two device calls, so decode and decode_float share one
        # compiled decoder per shape; the float image never leaves the device.
        return _by_image(lambda x: to_uint8_jit(self.decode_float_fn(self.params, x)), z)

    def decode_float(self, z: jax.Array | np.ndarray, *, clamp: bool = True) -> jax.Array:
        """As `decode` but float32 NHWC before quantisation; clamp=False gives the raw decoder output."""
        self._check_latents(z)
        x = self.decode_float_fn(self.params, z)  # a host array goes in as the program's argument
        return jnp.clip(x, -1.0, 1.0) if clamp else x

    def _check_images(self, images) -> None:
        fh, fw = self.config.pixels_per_token
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[3] != self.config.in_channels or shape[1] % fh or shape[2] % fw:
            raise ImageInputError(
                f"VAE encode: images must be (B, H, W, {self.config.in_channels}) with H a "
                f"multiple of {fh} and W of {fw}; got {shape}"
            )

    def _check_latents(self, z) -> None:
        shape = tuple(z.shape)
        if len(shape) != 4 or shape[1] != self.config.token_channels:
            raise ValueError(f"VAE decode: latents must be (B, {self.config.token_channels}, h, w); got {shape}")

    def __repr__(self) -> str:
        return f"VAE({self.source}, dtype={self.dtype.name}, config={self.config})"


def _by_image(fn, batch: jax.Array | np.ndarray) -> jax.Array:
    """fn over a batch (a device or host array): whole on an accelerator or when the batch is split
    over devices (a mesh); on one CPU device image by image (batch-1 programs, so an image's result
    never depends on its batch mates), the images side by side on host threads. There the batch is
    split and the results joined in host memory (which is the device's): no slicing or
    concatenating program."""
    spread = isinstance(batch, jax.Array) and len(batch.sharding.device_set) > 1
    if batch.shape[0] < 2 or jax.default_backend() != "cpu" or spread:
        return fn(batch)
    host = np.asarray(batch)
    images = side_by_side(fn, [host[i : i + 1] for i in range(host.shape[0])])
    return jax.device_put(np.concatenate([np.asarray(image) for image in images]))


def load_vae(
    path: str | Path, dtype: str | jnp.dtype = "float32", config: VAEConfig | dict | str | Path | None = None
) -> VAE:
    """Load a FLUX.2 AE from a diffusers `vae/` folder, a pipeline root holding `vae/`, or a BFL
    `ae.safetensors` file. `dtype` is the weight and compute dtype ("float32" or "bfloat16").

    `config` overrides the architecture (a VAEConfig, a diffusers config dict or config.json path);
    by default it is the folder's config.json, or, for a single file, read from the tensor shapes
    with the released AE's group count and BatchNorm eps. Raises CheckpointError naming the file.
    """
    params, resolved, source = read_vae_checkpoint(path, jnp.dtype(dtype), config)
    return VAE(params, resolved, jnp.dtype(dtype), source)
