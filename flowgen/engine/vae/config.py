"""Architecture configuration of the FLUX.2 autoencoder (diffusers `AutoencoderKLFlux2`, BFL `AutoEncoder`).

Field names follow the diffusers `vae/config.json`. The defaults are the released FLUX.2 AE
(channels 128/256/512/512, 2 resnets per level, 32 latent channels, 2x2 patchify to 128 tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowgen.errors import CheckpointError

# config.json keys that describe training, tiling or bookkeeping, not the network we run.
_IGNORED_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "batch_norm_momentum",
    "force_upcast",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as the encoder's
    layers_per_block: int = 2  # resnets per encoder level; decoder levels have one more
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        channels = set(self.block_out_channels) | set(self.decoder_channels)
        if len(self.decoder_channels) != len(self.block_out_channels):
            raise ValueError("decoder_block_out_channels must have one entry per encoder level")
        if any(c % self.norm_num_groups for c in channels):
            raise ValueError(
                f"norm_num_groups {self.norm_num_groups} does not divide every channel count {sorted(channels)}"
            )

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell before patchify (8 for the real AE)."""
        return 2 ** (self.num_levels - 1)

    @property
    def token_channels(self) -> int:
        """Channels of the patchified, BatchNorm-normalised latent (128 for the real AE)."""
        return self.latent_channels * math.prod(self.patch_size)

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """Image pixels per patchified latent cell along (H, W): 16x16 for the real AE."""
        return self.downscale * self.patch_size[0], self.downscale * self.patch_size[1]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str | Path) -> VAEConfig:
        """Build from a diffusers AutoencoderKLFlux2 config (dict, config.json or its folder).

        Raises CheckpointError on keys we do not know or values we cannot run (non-silu activations,
        other block types), so a config for a different autoencoder is never silently misread.
        """
        source = str(config) if not isinstance(config, Mapping) else "VAE config"
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{path}: cannot read VAE config ({err})") from None
            if not isinstance(config, Mapping):
                raise CheckpointError(f"{path}: VAE config is not a JSON object")
        class_name = config.get("_class_name", "AutoencoderKLFlux2")
        if class_name != "AutoencoderKLFlux2":
            raise CheckpointError(f"{source}: VAE class is {class_name}, need AutoencoderKLFlux2 (the FLUX.2 AE)")
        if config.get("act_fn", "silu") != "silu":
            raise CheckpointError(f"{source}: act_fn {config['act_fn']!r} is not supported (only 'silu')")
        for key, allowed in _BLOCK_TYPES.items():
            if any(t != allowed for t in config.get(key, ())):
                raise CheckpointError(f"{source}: {key} must all be {allowed}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields - _IGNORED_KEYS - set(_BLOCK_TYPES) - {"act_fn"}
        if unknown:
            raise CheckpointError(f"{source}: unknown VAE config keys {sorted(unknown)}")
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        for key in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        levels = len(values.get("block_out_channels", cls.block_out_channels))
        for key in _BLOCK_TYPES:
            if key in config and len(config[key]) != levels:
                raise CheckpointError(f"{source}: {key} needs one entry per block_out_channels level ({levels})")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: invalid VAE config ({err})") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json dict for this architecture (for tests and export)."""
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out["decoder_block_out_channels"] = (
            list(self.decoder_block_out_channels) if self.decoder_block_out_channels else None
        )
        out["patch_size"] = list(self.patch_size)
        out["down_block_types"] = [_BLOCK_TYPES["down_block_types"]] * self.num_levels
        out["up_block_types"] = [_BLOCK_TYPES["up_block_types"]] * self.num_levels
        out["act_fn"] = "silu"
        return out


FLUX2_AE = VAEConfig()
