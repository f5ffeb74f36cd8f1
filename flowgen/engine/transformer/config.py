"""Transformer configuration for the FLUX.2 [klein] family (and any smaller test config).

Field names follow BFL's `Flux2Params`; `from_diffusers` reads a diffusers `transformer/config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flowgen.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Flux2Config:
    hidden_size: int = 4096
    num_heads: int = 32
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 24
    mlp_ratio: float = 3.0
    in_channels: int = 128
    context_in_dim: int = 12288
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    timestep_dim: int = 256
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")

    @classmethod
    def named(cls, name: str) -> Flux2Config:
        try:
            return NAMED_CONFIGS[name]
        except KeyError:
            raise CheckpointError(
                f"unknown transformer config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}"
            ) from None

    @classmethod
    def from_diffusers(cls, config: dict | str | Path) -> Flux2Config:
        """Build from a diffusers Flux2Transformer2DModel config (dict, config.json, or its folder)."""
        source = config
        if isinstance(config, dict):
            values = config
        else:
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            source = path  # errors name the file itself
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{path}: cannot read transformer config ({err})") from None
        if not isinstance(values, dict):  # valid JSON, but a list or a number at the top
            raise CheckpointError(
                f"{source}: not a FLUX.2 transformer config (a JSON object is expected, "
                f"this holds a {type(values).__name__})"
            )
        try:
            if values.get("guidance_embeds"):
                raise CheckpointError(f"{source}: guidance_embeds=true is FLUX.2 dev, not a [klein] model")
            if values.get("patch_size", 1) != 1:
                raise CheckpointError(f"{source}: patch_size must be 1 for FLUX.2")
            out = values.get("out_channels") or values.get("in_channels", 128)
            if out != values.get("in_channels", 128):
                raise CheckpointError(f"{source}: out_channels must equal in_channels")
            return cls(
                hidden_size=int(values["num_attention_heads"]) * int(values["attention_head_dim"]),
                num_heads=int(values["num_attention_heads"]),
                depth=int(values["num_layers"]),
                depth_single_blocks=int(values["num_single_layers"]),
                mlp_ratio=float(values.get("mlp_ratio", 3.0)),
                in_channels=int(values.get("in_channels", 128)),
                context_in_dim=int(values["joint_attention_dim"]),
                axes_dim=tuple(int(a) for a in values.get("axes_dims_rope", (32, 32, 32, 32))),
                theta=int(values.get("rope_theta", 2000)),
                timestep_dim=int(values.get("timestep_guidance_channels", 256)),
                eps=float(values.get("eps", 1e-6)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: not a FLUX.2 transformer config ({err})") from None

    def to_diffusers(self) -> dict:
        """The diffusers config.json for this config (used to write tiny models and tests)."""
        return {
            "_class_name": "Flux2Transformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "out_channels": None,
            "num_layers": self.depth,
            "num_single_layers": self.depth_single_blocks,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_in_dim,
            "timestep_guidance_channels": self.timestep_dim,
            "mlp_ratio": self.mlp_ratio,
            "axes_dims_rope": list(self.axes_dim),
            "rope_theta": self.theta,
            "eps": self.eps,
            "guidance_embeds": False,
        }


NAMED_CONFIGS = {
    "klein-9b": Flux2Config(),
    "klein-4b": Flux2Config(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680),
}
# The KV and base variants share their size's tensor shapes.
NAMED_CONFIGS["klein-9b-kv"] = NAMED_CONFIGS["klein-9b"]
NAMED_CONFIGS["klein-base-9b"] = NAMED_CONFIGS["klein-9b"]
NAMED_CONFIGS["klein-base-4b"] = NAMED_CONFIGS["klein-4b"]
