"""LoRA / LoKr files for the FLUX.2 [klein] transformer, read into weight updates in BFL names.

    adapter = read_lora("brand.safetensors", config)    # LoraFile: patches + content sha256
    for patch in adapter.patches:
        patch.target, patch.chunk, patch.delta()       # BFL key, its row chunk, ΔW (rows, in) float32

Formats (recognised per tensor, so a file may mix them):
* ai-toolkit / BFL: `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight` (or `lora_down` /
  `lora_up`); PEFT's `base_model.model.` and ComfyUI's `model.diffusion_model.` prefixes alike;
* diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (also these
  names under `diffusion_model.` or with no prefix, as some exporters write them);
* kohya: `lora_unet_<BFL module, '.' written '_'>.lora_down.weight` / `.lora_up.weight`;
* LoKr (LyCORIS): any of the module names above (kohya names also as `lycoris_...`) with
  `.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`, and `.lokr_w2` or `.lokr_w2_a` + `.lokr_w2_b`.

ΔW = up @ down · alpha / rank for LoRA (rank = down's rows; no `.alpha` tensor: scale 1), and
ΔW = kron(w1, w2) · scale for LoKr, scale = alpha / rank when a factor is stored decomposed (rank =
that factor's inner size), else 1 — LyCORIS' rule (lycoris/modules/lokr.py), which diffusers'
`_bake_lokr_alpha_` and ComfyUI follow too.

The engine keeps BFL's fused projections, so a diffusers LoRA on `to_q` / `to_k` / `to_v` updates
rows [0, H) / [H, 2H) / [2H, 3H) of the fused `qkv` weight, and a BFL / kohya LoRA on the fused
`qkv` updates all of it (diffusers instead copies lora_A and splits lora_B three ways: the same ΔW).
diffusers' `norm_out.linear` stores BFL's final modulation with its (shift, scale) halves swapped,
so a LoRA written in diffusers names has its ΔW halves swapped back; one in BFL names is applied as
written (diffusers' loader does not swap those, see reference/jax_engine.md §4.1).

Anything else is refused, naming the tensors: unknown names, DoRA, biases, conv/Tucker LoKr, and
LoRAs whose shapes belong to another model size.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowgen.engine.transformer.config import NAMED_CONFIGS, Flux2Config
from flowgen.engine.transformer.keys import (
    DOUBLE_BLOCK,
    DOUBLE_BLOCK_FUSED,
    SINGLE_BLOCK,
    SWAPPED_HALVES,
    TOP_LEVEL,
    expected_bfl_shapes,
    rule_for_bfl,
    rule_for_diffusers,
)
from flowgen.engine.weights.safetensors_io import open_safetensors
from flowgen.errors import CheckpointError

MAX_WEIGHT = 4.0  # the spec's range for lora[].weight
_SHOWN = 5

# Prefixes that only say "the transformer" (longest first); kohya / LyCORIS names are handled apart.
_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_")
_ALIASES = (("sformer_blocks.", "transformer_blocks."),)  # a truncated name some exporters write

# Per-module tensors, longest suffix first (so `lokr_w1_a` is not read as `lokr_w1`).
_LORA_DOWN = ("lora_A.weight", "lora_down.weight")
_LORA_UP = ("lora_B.weight", "lora_up.weight")
_LOKR = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2")
_SUFFIXES = tuple(sorted((*_LORA_DOWN, *_LORA_UP, *_LOKR, "alpha"), key=len, reverse=True))

# kohya writes BFL module paths with '_' for '.': a lookup from that spelling back to the BFL path.
_KOHYA_TOP = {name.replace(".", "_"): name for name in (*TOP_LEVEL, *SWAPPED_HALVES)}
_KOHYA_BLOCK = {
    "double_blocks": {n.replace(".", "_"): n for n in (*DOUBLE_BLOCK, *DOUBLE_BLOCK_FUSED) if "norm" not in n},
    "single_blocks": {n.replace(".", "_"): n for n in SINGLE_BLOCK if "norm" not in n},
}
_KOHYA_BLOCK_NAME = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


@dataclass(frozen=True)
class Patch:
    """One module's update: ΔW for one row chunk of the BFL weight `target` (torch layout (out, in))."""

    target: str  # e.g. "double_blocks.0.img_attn.qkv.weight"
    chunk: tuple[int, int]  # (index, count): which equal row chunk of the target (q/k/v of a fused qkv), or (0, 1)
    kind: str  # "lora" (factors = (up, down)) or "lokr" (factors = (w1, w2))
    factors: tuple[np.ndarray, ...]  # float32
    scale: float
    swap_halves: bool = False  # ΔW is in diffusers' (scale, shift) order: swap its row halves back
    source: str = ""  # the module name as written in the file (for messages)

    def rows(self, target_rows: int) -> tuple[int, int]:
        """[start, stop) of the target's rows this patch updates."""
        index, count = self.chunk
        size = target_rows // count
        return (index * size, (index + 1) * size)

    @property
    def shape(self) -> tuple[int, int]:
        """The (rows, in) shape of ΔW."""
        a, b = self.factors
        if self.kind == "lora":
            return (a.shape[0], b.shape[1])
        return (a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])

    def delta(self) -> np.ndarray:
        """ΔW (rows, in), float32, scale included and halves already in BFL order (numpy reference)."""
        a, b = self.factors
        delta = (a @ b if self.kind == "lora" else np.kron(a, b)) * np.float32(self.scale)
        if self.swap_halves:
            half = delta.shape[0] // 2
            delta = np.concatenate([delta[half:], delta[:half]])
        return delta.astype(np.float32, copy=False)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read for one model config."""

    path: Path
    sha256: str  # of the file's bytes: what identifies the weights it makes
    patches: tuple[Patch, ...]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora(path: str | Path, config: Flux2Config) -> LoraFile:
    """Read a LoRA / LoKr .safetensors for a transformer of `config`; CheckpointError (one line) if it
    cannot be used: unknown tensors, incomplete modules, or shapes of another model size."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA {path}: only .safetensors files are read")
    tensors = open_safetensors(path)
    if not len(tensors):
        raise CheckpointError(f"LoRA {path}: holds no tensors")
    modules, unknown = _group_by_module(tensors)
    patches = []
    for written, parts in modules.items():
        target = _target_of(written)
        if target is None:
            unknown += [f"{written}.{suffix}" for suffix in parts]
            continue
        patches.append(_patch(path, written, target, parts))
    if unknown:
        raise CheckpointError(unknown_tensors_message(path, unknown))
    _check_fits(path, patches, config)
    return LoraFile(path, file_sha256(path), tuple(patches))


def unknown_tensors(path: str | Path) -> list[str]:
    """The tensor names of a LoRA file that no supported format explains, from its header alone
    (JAX-free and cheap: `validate` and `plan` call it). CheckpointError if it is not a safetensors file."""
    names = list(open_safetensors(Path(path)))
    if not names:
        raise CheckpointError(f"LoRA {path}: holds no tensors")
    unknown = []
    for key in names:
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None or _target_of(key[: -len(suffix) - 1]) is None:
            unknown.append(key)
    return unknown


def unknown_tensors_message(path: Path, unknown: list[str]) -> str:
    return (
        f"LoRA {path}: {len(unknown)} tensor(s) flowgen does not know for FLUX.2 [klein]: "
        f"{_names(sorted(unknown))} (read: ai-toolkit/BFL, kohya, diffusers/PEFT LoRA and LoKr)"
    )


def _group_by_module(tensors) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """{module name as written: {suffix: float32 array}}, and the tensor names no suffix matched."""
    modules: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    unknown = []
    for key in tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        modules[key[: -len(suffix) - 1]][suffix] = np.asarray(tensors[key], dtype=np.float32)
    return modules, unknown


@dataclass(frozen=True)
class _Target:
    key: str  # BFL weight key
    chunk: int  # which of `chunks` equal row chunks (q, k, v of a fused qkv), else 0
    chunks: int
    swap_halves: bool


def _target_of(written: str) -> _Target | None:
    """The BFL weight a module name (any supported spelling) updates, or None if unknown."""
    name = written
    for prefix in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            bfl = _kohya_module(name[len(prefix) :])
            return None if bfl is None else _Target(bfl + ".weight", 0, 1, False)
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for alias, real in _ALIASES:
        if name.startswith(alias):
            name = real + name[len(alias) :]
    rule = rule_for_bfl(name + ".weight")  # QK-norms have `.scale` in BFL names: never a match here
    if rule is not None:
        return _Target(rule.bfl, 0, 1, False)
    rule = rule_for_diffusers(name + ".weight")
    if rule is None or rule.bfl.endswith(".scale"):  # QK-norm scales are not linear layers
        return None
    return _Target(rule.bfl, rule.diffusers.index(name + ".weight"), len(rule.diffusers), rule.swap_halves)


def _kohya_module(name: str) -> str | None:
    if name in _KOHYA_TOP:
        return _KOHYA_TOP[name]
    match = _KOHYA_BLOCK_NAME.match(name)
    if match and match.group(3) in _KOHYA_BLOCK[match.group(1)]:
        return f"{match.group(1)}.{match.group(2)}.{_KOHYA_BLOCK[match.group(1)][match.group(3)]}"
    return None


def _patch(path: Path, written: str, target: _Target, parts: dict[str, np.ndarray]) -> Patch:
    """One module's tensors as a Patch (sizes are checked against the model later)."""

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"LoRA {path}: module {written}: {why}")

    stored_alpha = parts.get("alpha")
    if stored_alpha is not None and stored_alpha.size != 1:
        raise fail(f"alpha must be a single number, got shape {stored_alpha.shape}")
    alpha = None if stored_alpha is None else float(stored_alpha.reshape(()))
    if any(s.startswith("lokr_") for s in parts):
        if any(s in parts for s in (*_LORA_DOWN, *_LORA_UP)):
            raise fail("mixes LoRA and LoKr tensors")
        w1, rank1 = _lokr_factor(parts, "lokr_w1", fail)
        w2, rank2 = _lokr_factor(parts, "lokr_w2", fail)
        rank = rank2 if rank2 is not None else rank1  # diffusers' _bake_lokr_alpha_ reads w2_b first
        scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
        kind, factors = "lokr", (w1, w2)
    else:
        down = next((parts[s] for s in _LORA_DOWN if s in parts), None)
        up = next((parts[s] for s in _LORA_UP if s in parts), None)
        if down is None or up is None:
            raise fail("needs both a down (lora_A / lora_down) and an up (lora_B / lora_up) weight")
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise fail(f"up {up.shape} and down {down.shape} are not the two factors of one linear layer")
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        kind, factors = "lora", (up, down)
    return Patch(target.key, (target.chunk, target.chunks), kind, factors, scale, target.swap_halves, written)


def _lokr_factor(parts, name: str, fail) -> tuple[np.ndarray, int | None]:
    """(the factor, its rank when stored decomposed, else None)."""
    if name in parts:
        factor, rank = parts[name], None
    elif name + "_a" in parts and name + "_b" in parts:
        a, b = parts[name + "_a"], parts[name + "_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise fail(f"{name}_a {a.shape} and {name}_b {b.shape} do not multiply")
        factor, rank = a @ b, b.shape[0]
    else:
        raise fail(f"needs {name} or both {name}_a and {name}_b")
    if factor.ndim != 2:
        raise fail(f"{name} has shape {factor.shape}: only linear-layer LoKr is supported")
    return factor, rank


def _check_fits(path: Path, patches: list[Patch], config: Flux2Config) -> None:
    """Every patch names a weight of this config and has its shape; else say which size it was made for."""
    problems = _misfits(patches, config)
    if not problems:
        return
    made_for = [name for name, cfg in NAMED_CONFIGS.items() if cfg != config and not _misfits(patches, cfg)]
    sizes = sorted({_size_name(NAMED_CONFIGS[n]) for n in made_for})
    was = f"it was made for {' / '.join(sizes)}" if sizes else "it was made for another model size"
    raise CheckpointError(
        f"LoRA {path} does not fit this model ({_size_name(config)}): {was}; {'; '.join(problems[:3])}"
    )


def _misfits(patches: list[Patch], config: Flux2Config) -> list[str]:
    expected = expected_bfl_shapes(config)
    problems = []
    for patch in patches:
        if patch.target not in expected:
            problems.append(f"{patch.source}: no {patch.target.rsplit('.', 1)[0]} in this model")
            continue
        rows, cols = expected[patch.target]
        want = (rows // patch.chunk[1], cols)
        if patch.shape != want:
            problems.append(f"{patch.source}: ΔW {patch.shape}, the model's weight {want}")
    return problems


def _size_name(config: Flux2Config) -> str:
    """'FLUX.2 [klein] 4B (hidden 3072)' for the named sizes, else the sizes themselves."""
    for name in ("klein-4b", "klein-9b"):
        if NAMED_CONFIGS[name] == config:
            return f"FLUX.2 [klein] {name.split('-')[1].upper()} (hidden {config.hidden_size})"
    return f"hidden {config.hidden_size}, {config.depth} double + {config.depth_single_blocks} single blocks"


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
