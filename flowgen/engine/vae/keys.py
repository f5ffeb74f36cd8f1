"""Tensor names of the FLUX.2 autoencoder: the diffusers layout (canonical), the BFL `ae.safetensors`
layout, the mapping between them, and the architecture read back from tensor shapes.

Canonical = diffusers `AutoencoderKLFlux2` state-dict names with PyTorch shapes. BFL differs by
(flux2_klein.md §7.2; same renames as diffusers' generic `convert_ldm_vae_checkpoint`):
  encoder.down.{i}.block.{j}         <-> encoder.down_blocks.{i}.resnets.{j}
  encoder.down.{i}.downsample.conv   <-> encoder.down_blocks.{i}.downsamplers.0.conv
  decoder.up.{b}.block.{j}           <-> decoder.up_blocks.{n-1-b}.resnets.{j}   (level order reversed)
  decoder.up.{b}.upsample.conv       <-> decoder.up_blocks.{n-1-b}.upsamplers.0.conv
  *.mid.block_1 / block_2            <-> *.mid_block.resnets.0 / resnets.1
  *.mid.attn_1.{norm,q,k,v,proj_out} <-> *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                         (BFL: 1x1 convs (C,C,1,1); diffusers: Linear (C,C))
  nin_shortcut                       <-> conv_shortcut
  *.norm_out                         <-> *.conv_norm_out
  encoder.quant_conv                 <-> quant_conv            (BFL keeps it inside the encoder)
  decoder.post_quant_conv            <-> post_quant_conv       (BFL keeps it inside the decoder)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from flowgen.engine.vae.config import VAEConfig

Shape = tuple[int, ...]
# Present in some checkpoints, never used by inference.
IGNORED_KEYS = frozenset({"bn.num_batches_tracked"})
# Single-file checkpoints from other tools sometimes nest the AE under one of these.
KNOWN_PREFIXES = ("first_stage_model.", "vae.", "ae.")


# ---------------------------------------------------------------------------------------------
# expected diffusers tensors for a config


def _conv(out: dict[str, Shape], name: str, cin: int, cout: int, k: int) -> None:
    out[f"{name}.weight"] = (cout, cin, k, k)
    out[f"{name}.bias"] = (cout,)


def _norm(out: dict[str, Shape], name: str, c: int) -> None:
    out[f"{name}.weight"] = (c,)
    out[f"{name}.bias"] = (c,)


def _resnet(out: dict[str, Shape], name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout, 3)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.conv_shortcut", cin, cout, 1)


def _mid(out: dict[str, Shape], name: str, c: int, attention: bool) -> None:
    _resnet(out, f"{name}.resnets.0", c, c)
    if attention:
        attn = f"{name}.attentions.0"
        _norm(out, f"{attn}.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{attn}.{proj}.weight"] = (c, c)
            out[f"{attn}.{proj}.bias"] = (c,)
    _resnet(out, f"{name}.resnets.1", c, c)


def diffusers_shapes(config: VAEConfig) -> dict[str, Shape]:
    """Every tensor an `AutoencoderKLFlux2` with this config holds, name -> PyTorch shape."""
    out: dict[str, Shape] = {}
    enc, n = config.block_out_channels, config.num_levels
    _conv(out, "encoder.conv_in", config.in_channels, enc[0], 3)
    for i in range(n):
        cin = enc[max(i - 1, 0)]
        for j in range(config.layers_per_block):
            _resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else enc[i], enc[i])
        if i < n - 1:
            _conv(out, f"encoder.down_blocks.{i}.downsamplers.0.conv", enc[i], enc[i], 3)
    _mid(out, "encoder.mid_block", enc[-1], config.mid_block_add_attention)
    _norm(out, "encoder.conv_norm_out", enc[-1])
    _conv(out, "encoder.conv_out", enc[-1], 2 * config.latent_channels, 3)
    if config.use_quant_conv:
        _conv(out, "quant_conv", 2 * config.latent_channels, 2 * config.latent_channels, 1)
    if config.use_post_quant_conv:
        _conv(out, "post_quant_conv", config.latent_channels, config.latent_channels, 1)

    dec = tuple(reversed(config.decoder_channels))  # diffusers up_blocks run deepest level first
    _conv(out, "decoder.conv_in", config.latent_channels, dec[0], 3)
    _mid(out, "decoder.mid_block", dec[0], config.mid_block_add_attention)
    for i in range(n):
        cin = dec[max(i - 1, 0)]
        for j in range(config.layers_per_block + 1):
            _resnet(out, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else dec[i], dec[i])
        if i < n - 1:
            _conv(out, f"decoder.up_blocks.{i}.upsamplers.0.conv", dec[i], dec[i], 3)
    _norm(out, "decoder.conv_norm_out", dec[-1])
    _conv(out, "decoder.conv_out", dec[-1], config.out_channels, 3)
    out["bn.running_mean"] = (config.token_channels,)
    out["bn.running_var"] = (config.token_channels,)
    return out


# ---------------------------------------------------------------------------------------------
# BFL <-> diffusers names

_PLAIN = [  # (BFL fragment, diffusers fragment), applied as whole-segment substring renames
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
]
_BFL_DOWN = re.compile(r"^encoder\.down\.(\d+)\.(block|downsample)\.")
_BFL_UP = re.compile(r"^decoder\.up\.(\d+)\.(block|upsample)\.")
_DIF_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.")
_DIF_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")


def bfl_to_diffusers(name: str, num_levels: int) -> str:
    """Diffusers name of a BFL `ae.safetensors` tensor (names it does not know pass through)."""
    if name.startswith("encoder.quant_conv."):
        return name[len("encoder.") :]
    if name.startswith("decoder.post_quant_conv."):
        return name[len("decoder.") :]
    name = _BFL_DOWN.sub(
        lambda m: f"encoder.down_blocks.{m[1]}." + ("resnets." if m[2] == "block" else "downsamplers.0."), name
    )
    name = _BFL_UP.sub(
        lambda m: (
            f"decoder.up_blocks.{num_levels - 1 - int(m[1])}." + ("resnets." if m[2] == "block" else "upsamplers.0.")
        ),
        name,
    )
    for bfl, dif in _PLAIN:
        name = name.replace(bfl, dif)
    return name


def diffusers_to_bfl(name: str, num_levels: int) -> str:
    """BFL name of a diffusers tensor; the exact inverse of `bfl_to_diffusers`."""
    if name.startswith("quant_conv."):
        return "encoder." + name
    if name.startswith("post_quant_conv."):
        return "decoder." + name
    name = _DIF_DOWN.sub(lambda m: f"encoder.down.{m[1]}." + ("block." if m[2] == "resnets" else "downsample."), name)
    name = _DIF_UP.sub(
        lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}." + ("block." if m[2] == "resnets" else "upsample."), name
    )
    for bfl, dif in _PLAIN:
        name = name.replace(dif, bfl)
    return name


def is_bfl_attention_conv(name: str) -> bool:
    """BFL stores the mid-block attention projections as 1x1 convs; diffusers as Linear."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) is not None


def looks_like_bfl(names: set[str]) -> bool:
    return "encoder.conv_in.weight" in names and any(n.startswith("encoder.down.") for n in names)


def count_bfl_levels(names: set[str]) -> int:
    levels = {int(m[1]) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n))}
    return max(levels) + 1 if levels else 0


# ---------------------------------------------------------------------------------------------
# architecture from shapes (for single files without config.json)


def infer_config(shapes: Mapping[str, Shape], base: VAEConfig = VAEConfig()) -> VAEConfig:
    """Read the architecture from diffusers-named tensor shapes.

    Channels, level count, resnets per level, latent channels, decoder widths and the quant/attention
    toggles are visible in the shapes; the GroupNorm group count and the BatchNorm eps are not, so
    they come from `base` (the released FLUX.2 AE: 32 groups, eps 1e-4). Raises KeyError/ValueError
    when the tensors are not an autoencoder (the caller turns that into a CheckpointError).
    """
    names = set(shapes)
    levels = sorted({int(m[1]) for n in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))})
    if not levels or levels != list(range(len(levels))):
        raise KeyError("encoder.down_blocks.*")
    n = len(levels)
    enc = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    dec = tuple(shapes[f"decoder.up_blocks.{n - 1 - b}.resnets.0.conv1.weight"][0] for b in range(n))
    layers = len({m[1] for name in names if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", name))})
    latent = shapes["decoder.conv_in.weight"][1]
    patch_cells = shapes["bn.running_mean"][0] // latent
    if patch_cells * latent != shapes["bn.running_mean"][0] or patch_cells != base.patch_size[0] * base.patch_size[1]:
        raise ValueError(
            f"bn.running_mean has {shapes['bn.running_mean'][0]} channels, "
            f"not {base.patch_size[0]}x{base.patch_size[1]}x{latent}"
        )
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        block_out_channels=enc,
        decoder_block_out_channels=None if dec == enc else dec,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=base.norm_num_groups,
        use_quant_conv="quant_conv.weight" in names,
        use_post_quant_conv="post_quant_conv.weight" in names,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in names,
        batch_norm_eps=base.batch_norm_eps,
        patch_size=base.patch_size,
    )
