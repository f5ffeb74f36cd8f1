"""FLUX.2 transformer tensor names: BFL single-file layout ↔ diffusers layout.

The engine speaks BFL names (fused `qkv`, fused `linear1`, final layer as (shift, scale)), because
fused projections are what a JAX forward wants. Diffusers splits the double-block `qkv` into three
row chunks, renames modules, calls RMSNorm scales `.weight` and stores the final modulation as
(scale, shift). The tables below are the one place that knows this; they are written BFL → diffusers,
like diffusers' own `convert_flux2_transformer_checkpoint_to_diffusers`
(diffusers/loaders/single_file_utils.py), and read backwards for the inverse. No transposes and no
dtype changes are involved in either direction.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping

import numpy as np

from flowgen.engine.transformer.config import Flux2Config

# Top-level modules, renamed as a whole (the parameter suffix is kept: always ".weight").
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}

# BFL's final modulation emits (shift, scale); diffusers' AdaLayerNormContinuous emits (scale, shift):
# the two row halves of the weight trade places. The swap is its own inverse.
SWAPPED_HALVES = {
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

# Inside `double_blocks.{i}.` (BFL) ↔ `transformer_blocks.{i}.` (diffusers).
DOUBLE_BLOCK = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}

# One fused BFL tensor whose rows are [q | k | v] ↔ three diffusers tensors of equal row count.
DOUBLE_BLOCK_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}

# Inside `single_blocks.{j}.` (BFL) ↔ `single_transformer_blocks.{j}.` (diffusers). `linear1` stays
# fused in diffusers too ([q | k | v | mlp gate | mlp up]), so nothing is split here.
SINGLE_BLOCK = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}

# RMSNorm (QK-norm) parameters: BFL `RMSNorm.scale`, diffusers `torch.nn.RMSNorm.weight`.
NORM_MODULE = re.compile(r"\.(query_norm|key_norm)$")

# (BFL block list, diffusers block list, names inside one block: BFL module → diffusers module(s))
_BLOCKS: tuple[tuple[str, str, Mapping[str, str | tuple[str, ...]]], ...] = (
    ("double_blocks", "transformer_blocks", {**DOUBLE_BLOCK, **DOUBLE_BLOCK_FUSED}),
    ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """How one BFL tensor is stored in diffusers: under one name, or split into row chunks."""

    bfl: str
    diffusers: tuple[str, ...]  # one name, or (q, k, v) names for a fused qkv
    swap_halves: bool = False  # final layer: (shift, scale) ↔ (scale, shift)


def _param_suffix(module: str) -> tuple[str, str]:
    """The (BFL, diffusers) parameter suffix for a BFL module: norms are `.scale` in BFL files."""
    return (".scale", ".weight") if NORM_MODULE.search(module) else (".weight", ".weight")


def _names_of(target: str | tuple[str, ...]) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else target


def _make_rule(bfl_module: str, diffusers_module: str | tuple[str, ...], swap: bool = False) -> KeyRule:
    bfl_suffix, dif_suffix = _param_suffix(bfl_module)
    return KeyRule(bfl_module + bfl_suffix, tuple(n + dif_suffix for n in _names_of(diffusers_module)), swap)


def rule_for_bfl(key: str) -> KeyRule | None:
    """The mapping rule for a BFL tensor name, or None if the name is not a FLUX.2 [klein] tensor."""
    module = key.rpartition(".")[0]
    if module in TOP_LEVEL:
        rule = _make_rule(module, TOP_LEVEL[module])
    elif module in SWAPPED_HALVES:
        rule = _make_rule(module, SWAPPED_HALVES[module], swap=True)
    else:
        for bfl_prefix, dif_prefix, table in _BLOCKS:
            match = re.fullmatch(rf"{bfl_prefix}\.(\d+)\.(.+)", module)
            if match and match.group(2) in table:
                index, inner = match.groups()
                rule = _make_rule(module, tuple(f"{dif_prefix}.{index}.{t}" for t in _names_of(table[inner])))
                break
        else:
            return None
    return rule if rule.bfl == key else None  # right module, wrong parameter (e.g. a bias)


# Read backwards: diffusers module → BFL module (each of q, k, v leads to the fused module).
_TOP_INVERSE = {dif: bfl for bfl, dif in {**TOP_LEVEL, **SWAPPED_HALVES}.items()}
_BLOCKS_INVERSE = tuple(
    (dif_prefix, bfl_prefix, {d: bfl for bfl, dif in table.items() for d in _names_of(dif)})
    for bfl_prefix, dif_prefix, table in _BLOCKS
)


def rule_for_diffusers(key: str) -> KeyRule | None:
    """The rule that produces this diffusers tensor (for q/k/v: the fused rule), or None if unknown."""
    module, _, param = key.rpartition(".")
    if param != "weight":
        return None
    if module in _TOP_INVERSE:
        return rule_for_bfl(_TOP_INVERSE[module] + ".weight")
    for dif_prefix, bfl_prefix, table in _BLOCKS_INVERSE:
        match = re.fullmatch(rf"{dif_prefix}\.(\d+)\.(.+)", module)
        if match and match.group(2) in table:
            bfl_module = f"{bfl_prefix}.{match.group(1)}.{table[match.group(2)]}"
            return rule_for_bfl(bfl_module + _param_suffix(bfl_module)[0])
    return None


def _swap_halves(array: np.ndarray) -> np.ndarray:
    half = array.shape[0] // 2
    return np.concatenate([array[half:], array[:half]], axis=0)


def bfl_to_diffusers(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and split BFL tensors into the diffusers layout (eager; chunks are views).

    Unknown names raise KeyError: this is a converter for well-formed FLUX.2 [klein] tensors (tests,
    tiny-model writers), not a validator.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        rule = rule_for_bfl(key)
        if rule is None:
            raise KeyError(f"{key!r} is not a FLUX.2 [klein] transformer tensor")
        if rule.swap_halves:
            out[rule.diffusers[0]] = _swap_halves(value)
        elif len(rule.diffusers) == 1:
            out[rule.diffusers[0]] = value
        else:
            for name, chunk in zip(rule.diffusers, np.split(value, len(rule.diffusers), axis=0)):
                out[name] = chunk
    return out


def diffusers_shapes(bfl_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The diffusers names and shapes that a set of BFL shapes is stored as (for validation)."""
    out = {}
    for key, shape in bfl_shapes.items():
        rule = rule_for_bfl(key)
        if rule is None:
            raise KeyError(f"{key!r} is not a FLUX.2 [klein] transformer tensor")
        rows = shape[0] // len(rule.diffusers)
        for name in rule.diffusers:
            out[name] = (rows, *shape[1:])
    return out


class DiffusersAsBfl(Mapping):
    """A lazy, read-only BFL-named view over diffusers-named tensors.

    Nothing is read until a tensor is asked for; a fused `qkv` is concatenated on demand (the only
    temporary is that one tensor), and the final modulation halves are swapped back. Diffusers names
    that have no BFL counterpart are listed in `unmapped` rather than exposed.
    """

    def __init__(self, source: Mapping[str, np.ndarray]):
        self.source = source
        self._rules: dict[str, KeyRule] = {}
        self.unmapped: list[str] = []
        for key in source:
            rule = rule_for_diffusers(key)
            if rule is None:
                self.unmapped.append(key)
            elif all(name in source for name in rule.diffusers):
                self._rules[rule.bfl] = rule
            # else: a partial q/k/v set; the BFL tensor is absent and shows up as missing.

    def __getitem__(self, key: str) -> np.ndarray:
        rule = self._rules[key]
        if rule.swap_halves:
            return _swap_halves(self.source[rule.diffusers[0]])
        if len(rule.diffusers) == 1:
            return self.source[rule.diffusers[0]]
        return np.concatenate([self.source[name] for name in rule.diffusers], axis=0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def shape(self, key: str) -> tuple[int, ...]:
        """The BFL shape of a tensor, from the source's shapes only (nothing is read)."""
        shapes = [_shape_of(self.source, name) for name in self._rules[key].diffusers]
        return (sum(s[0] for s in shapes), *shapes[0][1:])


def _shape_of(source: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(source[key].shape)


def expected_bfl_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a BFL FLUX.2 [klein] single file -> its torch shape."""
    h, m, d = config.hidden_size, config.mlp_hidden, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "img_in.weight": (h, config.in_channels),
        "txt_in.weight": (h, config.context_in_dim),
        "time_in.in_layer.weight": (h, config.timestep_dim),
        "time_in.out_layer.weight": (h, h),
        "double_stream_modulation_img.lin.weight": (6 * h, h),
        "double_stream_modulation_txt.lin.weight": (6 * h, h),
        "single_stream_modulation.lin.weight": (3 * h, h),
    }
    for i in range(config.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            shapes[p + "attn.qkv.weight"] = (3 * h, h)
            shapes[p + "attn.norm.query_norm.scale"] = (d,)
            shapes[p + "attn.norm.key_norm.scale"] = (d,)
            shapes[p + "attn.proj.weight"] = (h, h)
            shapes[p + "mlp.0.weight"] = (2 * m, h)
            shapes[p + "mlp.2.weight"] = (h, m)
    for j in range(config.depth_single_blocks):
        p = f"single_blocks.{j}."
        shapes[p + "linear1.weight"] = (3 * h + 2 * m, h)
        shapes[p + "linear2.weight"] = (h, h + m)
        shapes[p + "norm.query_norm.scale"] = (d,)
        shapes[p + "norm.key_norm.scale"] = (d,)
    shapes["final_layer.linear.weight"] = (config.in_channels, h)
    shapes["final_layer.adaLN_modulation.1.weight"] = (2 * h, h)
    return shapes
