"""FLUX.2 [klein] generation: prompts (+ reference images) -> uint8 RGB images.

    pipe = Pipeline.from_pretrained("klein-9b-kv")     # or a diffusers folder, an AIR id, a card
    out = pipe.generate(prompts=["a red fox"], seeds=[7], width=1024, height=1024)
    out.images[0]        # (1024, 1024, 3) uint8
    out.timings          # seconds per stage: text, references, denoise, decode

Computes what diffusers' `Flux2KleinKVPipeline` (KV models) and `Flux2KleinPipeline` (plain and
base models) compute, batched so that an item's image never depends on its batch mates:
* each distinct prompt is encoded once, at batch 1 (`prompt_cache`);
* each reference image is VAE-encoded once, at batch 1; the KV model runs one reference pre-pass
  per distinct reference set and every step reads the cached K/V (`reference_cache`);
* items are grouped by reference set; each group runs one jitted sampling loop (`denoise`),
  then each image is decoded on its own (uint8 on device);
* seeds become noise per seed: `normal(key(seed), (128, H/16, W/16))`.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine import sampler
from flowgen.engine.denoise import Conditioning, Denoiser, make_schedule
from flowgen.engine.ids import image_ids, pack, text_ids, unpack
from flowgen.engine.images import default_output_size
from flowgen.engine.pipeline_request import PIXELS_PER_TOKEN, Request, check_request
from flowgen.engine.pipeline_source import ModelSource, resolve_source
from flowgen.engine.prompt_cache import PromptEncoder
from flowgen.engine.reference_cache import PreparedSet, ReferenceCache, prepare_set
from flowgen.errors import CheckpointError, RecipeError

log = logging.getLogger(__name__)
STAGES = ("text", "references", "denoise", "decode")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class GenerateOutput:
    images: list[np.ndarray]  # (H, W, 3) uint8, one per prompt, in order
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def seed_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.normal(jax.random.key(seed), shape)` for seeds of up to 64 bits.

    Equal to it for seeds < 2**32; above, the high word is kept (jax.random.key drops it when
    64-bit mode is off, so seeds differing only there would collide).
    """
    key = jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32))
    return jax.random.normal(key, shape, jnp.float32)


class Pipeline:
    """A loaded FLUX.2 [klein] model; see the module docstring."""

    def __init__(self, transformer, vae, tokenizer, text_encoder, source: ModelSource, *, dtype: str = "float32",
                 max_sequence_length: int = 512):
        self.transformer, self.vae, self.source = transformer, vae, source
        self.dtype = jnp.dtype(_DTYPES[dtype])
        self.is_kv, self.distilled = source.is_kv, source.distilled
        self.max_sequence_length = int(max_sequence_length)
        self.counters: collections.Counter = collections.Counter()  # work done, for tests and reports
        self.prompts = PromptEncoder(tokenizer, text_encoder, self.dtype, counters=self.counters)
        self.references = ReferenceCache(vae, transformer, counters=self.counters)
        self.denoiser = Denoiser(transformer.forward_fn)
        self._check_compatible(text_encoder)

    @classmethod
    def from_pretrained(cls, source: Any, dtype: str = "float32", max_sequence_length: int = 512) -> "Pipeline":
        """Load from a diffusers pipeline folder, a model card name, an AIR id or a card object."""
        from flowgen.engine.text_encoder import load_text_encoder
        from flowgen.engine.tokenizer import load_tokenizer
        from flowgen.engine.transformer_loading import load_transformer
        from flowgen.engine.vae import load_vae

        if dtype not in _DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not supported (allowed: {', '.join(_DTYPES)})")
        src = resolve_source(source)
        return cls(
            load_transformer(src.transformer, dtype=dtype),
            load_vae(src.root / "vae", dtype),
            load_tokenizer(src.root / "tokenizer", max_length=max_sequence_length),
            load_text_encoder(src.root / "text_encoder", dtype),
            src, dtype=dtype, max_sequence_length=max_sequence_length,
        )

    # ---- public --------------------------------------------------------------------------------

    @property
    def default_steps(self) -> int:
        return int(self.source.defaults.get("steps", 4 if self.distilled else 50))

    @property
    def default_guidance(self) -> float | None:
        return None if self.distilled else float(self.source.defaults.get("guidance", 4.0))

    def generate(self, prompts, references=None, width: int | None = None, height: int | None = None,
                 steps: int | None = None, seeds=None, latents=None, guidance: float | None = None,
                 negative_prompts=None, max_sequence_length: int | None = None) -> GenerateOutput:
        """Generate one image per prompt.

        references: None, or one list (possibly empty) of up to 4 images per prompt — PIL images,
        paths or uint8 arrays. width/height: multiples of 16; default the first reference's
        prepared size, else 1024. seeds (one per prompt) or latents (B, 128, H/16, W/16).
        guidance: CFG weight for base models (default 4.0; ignored by distilled models) with
        negative_prompts (default ""). Raises FlowgenError subclasses for bad arguments.
        """
        req = check_request(prompts, references, width, height, steps, seeds, latents, guidance, negative_prompts,
                            distilled=self.distilled, default_steps=self.default_steps,
                            default_guidance=self.default_guidance)
        if guidance is not None and guidance > 1.0 and self.distilled:
            log.warning("guidance %s is ignored: %s is step-distilled", guidance, self.source.name)
        length = int(max_sequence_length or self.max_sequence_length)
        timings = dict.fromkeys(STAGES, 0.0)
        images: list[np.ndarray | None] = [None] * len(req.prompts)

        start = time.perf_counter()
        txt = jax.block_until_ready(self.prompts.embeddings(req.prompts, length))
        neg = None
        if req.guidance is not None:
            neg = jax.block_until_ready(self.prompts.embeddings(req.negative_prompts, length))
        timings["text"] += time.perf_counter() - start

        start = time.perf_counter()
        ref_sets = [prepare_set(r, label=f"references[{i}]: ") if r else None for i, r in enumerate(req.references)]
        timings["references"] += time.perf_counter() - start

        for refs, members in _groups(ref_sets).items():
            idx = np.asarray(members)
            group_neg = None if neg is None else neg[idx]
            out = self._generate_group(req, idx, ref_sets[members[0]], txt[idx], group_neg, timings)
            for position, item in enumerate(members):
                images[item] = out[position]
        return GenerateOutput(images, {k: round(v, 6) for k, v in timings.items()})

    def clear_caches(self) -> None:
        """Drop cached prompt embeddings, reference latents and reference K/V (frees device memory)."""
        self.prompts.clear()
        self.references.clear()

    def identity(self) -> dict[str, Any]:
        """What determines this pipeline's images besides the request (for manifests)."""
        import flowgen

        return {
            "model": self.source.name,
            "card": self.source.identity,
            "kv": self.is_kv,
            "distilled": self.distilled,
            "flowgen": flowgen.__version__,
            "jax": jax.__version__,
            "dtype": self.dtype.name,
            "device_kind": jax.devices()[0].device_kind,
            "max_sequence_length": self.max_sequence_length,
        }

    # ---- internals -----------------------------------------------------------------------------

    def _generate_group(self, req: Request, idx: np.ndarray, refs: PreparedSet | None, txt, neg, timings) -> list:
        """All items sharing one reference set (or none): one sampling loop, one decode."""
        height, width = self._output_size(req, refs)
        h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        channels = self.transformer.config.in_channels

        start = time.perf_counter()
        x_ids = image_ids(h, w)
        ref_kv = ref_tokens = None
        if refs is not None and self.is_kv:
            ref_kv = self.references.kv(refs)
        elif refs is not None:
            ref = self.references.tokens(refs)
            ref_tokens, x_ids = ref.tokens, np.concatenate([x_ids, ref.ids], axis=0)
        jax.block_until_ready((ref_kv, ref_tokens))
        timings["references"] += time.perf_counter() - start

        start = time.perf_counter()
        x = self._initial_tokens(req, idx, (channels, h, w))
        schedule_np = sampler.sigmas(req.steps, h * w)
        times = sampler.model_timesteps(schedule_np, quantize_bf16=self.dtype == jnp.bfloat16)
        texts = txt if neg is None else jnp.concatenate([txt, neg], axis=0)
        cond = Conditioning(texts, self.transformer.rope(text_ids(texts.shape[1])), self.transformer.rope(x_ids),
                            ref_kv, ref_tokens)
        self.counters["denoise"] += 1
        tokens = jax.block_until_ready(
            self.denoiser(self.transformer.params, x, cond, make_schedule(schedule_np, times), req.guidance))
        timings["denoise"] += time.perf_counter() - start

        start = time.perf_counter()
        # one image at a time: one compiled decoder per size, and no dependence on batch mates
        latents = unpack(tokens.astype(jnp.float32), h, w)
        pixels = [self.vae.decode(latents[i : i + 1]) for i in range(latents.shape[0])]
        pixels = [np.asarray(p[0]) for p in pixels]  # dispatch all, then wait
        timings["decode"] += time.perf_counter() - start
        return pixels

    def _output_size(self, req: Request, refs: PreparedSet | None) -> tuple[int, int]:
        """(height, width): as given, else the first reference's prepared size, else the card's default."""
        default_h, default_w = default_output_size(refs.first_size if refs else None)
        if refs is None:
            default_h = self.source.defaults.get("height", default_h)
            default_w = self.source.defaults.get("width", default_w)
        return req.height or default_h, req.width or default_w

    def _initial_tokens(self, req: Request, idx: np.ndarray, shape: tuple[int, int, int]) -> jax.Array:
        """Packed initial noise (B, h·w, C) in the pipeline dtype, from seeds or given latents."""
        if req.latents is not None:
            latents = req.latents[idx]
            if latents.shape[1:] != shape:
                raise RecipeError(f"latents: expected (B, {', '.join(map(str, shape))}) for this output size; "
                                  f"got {req.latents.shape}")
            noise = jnp.asarray(latents.astype(np.float32))
        else:
            noise = jnp.stack([seed_noise(req.seeds[i], shape) for i in idx])
        return pack(noise.astype(self.dtype))

    def _check_compatible(self, text_encoder) -> None:
        cfg = self.transformer.config
        if text_encoder.output_size != cfg.context_in_dim:
            raise CheckpointError(f"{self.source.root}: text encoder gives {text_encoder.output_size}-wide embeddings "
                                  f"but the transformer expects {cfg.context_in_dim}")
        if self.vae.config.token_channels != cfg.in_channels:
            raise CheckpointError(f"{self.source.root}: the VAE makes {self.vae.config.token_channels}-channel latents "
                                  f"but the transformer expects {cfg.in_channels}")


def _groups(ref_sets: list[PreparedSet | None]) -> dict:
    """Items by reference-set content key (None: no references), in order of first appearance."""
    groups: dict = {}
    for index, refs in enumerate(ref_sets):
        groups.setdefault(None if refs is None else refs.key, []).append(index)
    return groups
