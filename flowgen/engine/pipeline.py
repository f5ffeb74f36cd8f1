"""FLUX.2 [klein] generation: prompts (+ reference images) -> uint8 RGB images.

    pipe = Pipeline.from_pretrained("klein-9b-kv")     # or a diffusers folder, an AIR id, a card
    out = pipe.generate(prompts=["a red fox"], seeds=[7], width=1024, height=1024)
    out.images[0]        # (1024, 1024, 3) uint8
    out.timings          # seconds per stage: text, references, denoise, decode
    out.layouts[0]       # what replays image 0 bit for bit: reference layout, length, batch
    pipe.img2img([pixels], ["a face"], strength=0.3, steps=20, seeds=[7])   # refine (faces/refine.py)

Computes what diffusers' `Flux2KleinKVPipeline` (KV models) and `Flux2KleinPipeline` (plain and
base models) compute, batched so that an item's image never depends on its batch mates beyond
float32 summation order:
* each distinct prompt is encoded once, at batch 1 (`text/prompt_cache.py`);
* each reference image is VAE-encoded once, at batch 1; the KV model runs one reference pre-pass
  per distinct reference set and every step reads the cached K/V (`references/cache.py`);
* the whole batch runs one jitted sampling loop (`sampling/loop.py`), whatever its rows' reference sets:
  they are stacked per row, padded and masked (`references/batch_layout.py`); then it is decoded at once;
* seeds become noise per seed: `normal(key(seed), (128, H/16, W/16))`; stochastic samplers draw
  their per-step noise from the same seed (`sampling/loop.py` `noise_keys`);
* `loras=` are merged into the transformer's weights for the call (`lora/merge.py`), from the kept
  base weights whenever the set changes; the reference K/V cache is keyed by the weights.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.engine.catalog.cards import ModelCard
from flowgen.engine.errors import EngineInputError
from flowgen.engine.host_memory import keep_freed_buffers
from flowgen.engine.lora.merge import LoraWeights
from flowgen.engine.references.batch_layout import Layout, batch_references
from flowgen.engine.references.cache import PreparedSet, ReferenceCache, prepare_set
from flowgen.engine.references.images import default_output_size
from flowgen.engine.request import PIXELS_PER_TOKEN, Request, check_request
from flowgen.engine.runtime import RuntimeConfig, compile_cache
from flowgen.engine.runtime.backend import guess_backend
from flowgen.engine.runtime.placement import Placement, placement_for, to_host
from flowgen.engine.sampling import ahead, names, step_cache_settings
from flowgen.engine.sampling.ahead import LoopShape
from flowgen.engine.sampling.loop import Conditioning, Denoiser, keys_of_words, noise_keys, seed_words
from flowgen.engine.source import ModelSource, resolve_source
from flowgen.engine.text.prompt_cache import PromptEncoder
from flowgen.engine.transformer.positions import image_ids, pack, text_ids, unpack
from flowgen.errors import CheckpointError, ImageInputError

log = logging.getLogger(__name__)
STAGES = ("text", "references", "denoise", "decode")


@dataclass
class GenerateOutput:
    images: list[np.ndarray]  # (H, W, 3) uint8, one per prompt, in order
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    layouts: list[dict] = field(default_factory=list)  # per image: `Layout.as_dict()` of its loop
    # per image, with a step cache: its settings, and per step the distance and whether it was computed
    step_caches: list[dict] = field(default_factory=list)

    @property
    def layout(self) -> dict:
        """The layout shared by every image (one loop), else {}."""
        return self.layouts[0] if self.layouts and all(x == self.layouts[0] for x in self.layouts) else {}


def seed_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """`jax.random.normal(jax.random.key(seed), shape)` for seeds of up to 64 bits.

    Equal to it for seeds < 2**32; above, the high word is kept (jax.random.key drops it when
    64-bit mode is off, so seeds differing only there would collide).
    """
    return _seed_noise(seed_words([seed])[0], tuple(shape))


def _normal(words, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.wrap_key_data(words), shape, jnp.float32)


_seed_noise = jax.jit(_normal, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _seed_noises(words, shape: tuple[int, ...]) -> jax.Array:
    """(B, *shape): `seed_noise` of each row's seed words, in one program (the same draws)."""
    return jnp.stack([_normal(words[row], shape) for row in range(words.shape[0])])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _seed_draws(words, shape: tuple[int, ...], dtype) -> tuple[jax.Array, jax.Array]:
    """From each row's seed words, in one program: the packed initial noise (B, h·w, C) in `dtype`
    and the stochastic samplers' keys (`noise_keys`)."""
    return pack(_seed_noises(words, shape).astype(dtype)), keys_of_words(words)


@functools.partial(jax.jit, static_argnums=1)
def _latent_tokens(latents, dtype) -> jax.Array:
    """Given latents (B, C, h, w) as packed tokens in `dtype` (one program)."""
    return pack(latents.astype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _token_latents(tokens, h: int, w: int) -> jax.Array:
    """Sampled tokens (B, h·w, C) as float32 latents (B, C, h, w) for the VAE (one program)."""
    return unpack(tokens.astype(jnp.float32), h, w)


def img2img_start(strength: float, steps: int) -> int:
    """The schedule index an img2img loop starts at: diffusers' `get_timesteps` (the Klein inpaint
    and Flux img2img pipelines), t_start = int(steps − min(steps·strength, steps)); `steps` means
    no step is left."""
    return int(max(steps - min(steps * strength, steps), 0))


def _compile_ahead(shapes, source: ModelSource, dtype: str, attention, where, text_length: int) -> list:
    """Start compiling the transformer programs of `shapes` (sampling/ahead.py)."""
    from flowgen.engine.transformer.checkpoint import transformer_config

    model = ahead.abstract_model(transformer_config(source.transformer), dtype, attention, where, source.is_kv)
    return ahead.start(
        shapes,
        model,
        distilled=source.distilled,
        text_length=text_length,
        placement=where,
        coefficients=source.defaults.get("teacache_coefficients"),
    )


def _img2img_images(images, count: int) -> np.ndarray:
    """`img2img` images as one (B, H, W, 3) uint8 array; one-line errors naming the argument."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or len(images) != count:
        raise ImageInputError(f"images: give one (H, W, 3) uint8 array per prompt ({count})")
    arrays = [np.asarray(image) for image in images]
    shape = arrays[0].shape
    if any(a.shape != shape or a.dtype != np.uint8 for a in arrays) or len(shape) != 3 or shape[2] != 3:
        raise ImageInputError("images: every image must be an (H, W, 3) uint8 array of one size")
    if shape[0] % PIXELS_PER_TOKEN or shape[1] % PIXELS_PER_TOKEN or not shape[0] or not shape[1]:
        raise ImageInputError(
            f"images: {shape[1]}x{shape[0]} is not allowed; both sides must be multiples of {PIXELS_PER_TOKEN}"
        )
    return np.stack(arrays)


class Pipeline:
    """A loaded FLUX.2 [klein] model; see the module docstring."""

    def __init__(
        self,
        transformer,
        vae,
        tokenizer,
        text_encoder,
        source: ModelSource,
        *,
        runtime: RuntimeConfig | None = None,
        max_sequence_length: int = 512,
        dtype: str | None = None,
        placement: Placement | None = None,
    ):
        self.transformer, self.vae, self.source = transformer, vae, source
        self.placement = placement  # the device mesh the weights were loaded onto; None: one device
        self.ahead_seconds = 0.0  # seconds compiling programs ahead of time (from_pretrained's compile_ahead)
        # the transformer was loaded in the runtime's dtype (from_pretrained) or brings its own
        self.runtime = (runtime or RuntimeConfig(dtype=dtype or transformer.dtype.name)).resolved()
        self.dtype = jnp.dtype(self.runtime.dtype)
        self.is_kv, self.distilled = source.is_kv, source.distilled
        self.max_sequence_length = int(max_sequence_length)
        self.counters: collections.Counter = collections.Counter()  # work done, for tests and reports
        self.prompts = PromptEncoder(tokenizer, text_encoder, self.dtype, counters=self.counters)
        self.references = ReferenceCache(vae, transformer, counters=self.counters)
        self.loras = LoraWeights(transformer, counters=self.counters)  # the weights under this batch's LoRAs
        self.params = transformer.params
        self.denoiser = Denoiser(transformer.forward_fn, transformer.stages, placement)
        self._check_compatible(text_encoder)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | ModelCard,
        runtime: RuntimeConfig | None = None,
        max_sequence_length: int = 512,
        *,
        dtype: str | None = None,
        compile_ahead: Sequence[LoopShape] = (),
    ) -> Pipeline:
        """Load from a diffusers pipeline folder, a model card name, an AIR id or a card object.

        runtime: dtype, attention kernel and device mesh (default: per backend, every device on
        "data", see `RuntimeConfig`); `dtype=` is a shorthand for `RuntimeConfig(dtype=...)`. Turns on
        JAX's persistent compilation cache first (`runtime/compile_cache.py`; FLOWGEN_COMPILE_CACHE).
        compile_ahead: the batches' shapes (and reference sets) whose programs compile in threads
        while the weights load (`sampling/ahead.py`); `ahead_seconds` says how long those compiles took.
        """
        from flowgen.engine.text.qwen3 import load_text_encoder
        from flowgen.engine.text.tokenizer import load_tokenizer
        from flowgen.engine.transformer.checkpoint import load_transformer
        from flowgen.engine.vae.model import load_vae

        if guess_backend() == "cpu":  # before JAX's CPU worker threads first allocate (host_memory)
            keep_freed_buffers()
        compile_cache.enable()  # before anything compiles
        runtime = runtime or RuntimeConfig(dtype=dtype)
        settings = runtime.resolved()
        dtype = settings.dtype
        assert dtype is not None  # resolved() chooses one
        src = resolve_source(source)
        where = placement_for(runtime.mesh, src, dtype)  # None on one device
        attention = None if runtime.attention == "auto" else settings.attention
        # ahead only into a persistent cache: the batches' own calls find the programs there
        ahead_of_time = bool(compile_ahead) and compile_cache.in_use() is not None
        compiling = (
            _compile_ahead(compile_ahead, src, dtype, attention, where, max_sequence_length) if ahead_of_time else []
        )
        with where.loading() if where is not None else contextlib.nullcontext():  # weights: host -> their shards
            vae = load_vae(src.root / "vae", dtype)  # first: its programs compile while the rest loads
            if ahead_of_time:
                compiling += ahead.start_vae(compile_ahead, vae, where)
            transformer = load_transformer(src.transformer, dtype=dtype)
            text_encoder = load_text_encoder(src.root / "text_encoder", dtype)
        if runtime.attention != "auto":
            transformer.use_attention(settings.attention)
        pipe = cls(
            transformer,
            vae,
            load_tokenizer(src.root / "tokenizer", max_length=max_sequence_length),
            text_encoder,
            src,
            runtime=runtime,
            max_sequence_length=max_sequence_length,
            placement=where,
        )
        pipe.ahead_seconds = ahead.finish(compiling)  # before the first batch
        return pipe

    # ---- public --------------------------------------------------------------------------------

    @property
    def default_steps(self) -> int:
        return int(self.source.defaults.get("steps", 4 if self.distilled else 50))

    @property
    def default_guidance(self) -> float | None:
        return None if self.distilled else float(self.source.defaults.get("guidance", 4.0))

    def generate(
        self,
        prompts,
        references=None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        seeds=None,
        latents=None,
        guidance: float | None = None,
        negative_prompts=None,
        max_sequence_length: int | None = None,
        *,
        scheduler: str | None = None,
        layout: dict | None = None,
        on_step: Callable[[int], None] | None = None,
        acceleration: str | None = None,
        accelerator_options: dict | None = None,
        loras=None,
    ) -> GenerateOutput:
        """Generate one image per prompt.

        references: None, or one list (possibly empty) of up to 4 images per prompt — PIL images,
        paths or uint8 arrays. width/height: multiples of 16; default the first reference's
        prepared size, else 1024 (rows of different output sizes run as separate loops).
        seeds (one per prompt) or latents (B, 128, H/16, W/16). guidance: CFG weight for base
        models (default 4.0; ignored by distilled models) with negative_prompts (default "").
        scheduler: a spec scheduler name (`sampling.names`; default Klein's flow Euler).
        layout: a recorded `GenerateOutput.layouts` entry, to replay its arithmetic exactly.
        on_step(steps_done) is called on the host after every sampling step.
        acceleration (spec preset, default "high") and accelerator_options (the spec's
        acceleratorOptions dict): step caches (`step_cache_settings.resolve`).
        loras: [(.safetensors path, weight −4..4)] merged into the transformer for this call (every
        prompt shares them; `lora/merge.py`); None or [] = the base weights.
        Raises FlowgenError subclasses for bad arguments.
        """
        req = check_request(
            prompts,
            references,
            width,
            height,
            steps,
            seeds,
            latents,
            guidance,
            negative_prompts,
            distilled=self.distilled,
            default_steps=self.default_steps,
            default_guidance=self.default_guidance,
        )
        if guidance is not None and guidance > 1.0 and self.distilled:
            log.warning("guidance %s is ignored: %s is step-distilled", guidance, self.source.name)
        try:
            choice = names.resolve(scheduler)
        except names.SchedulerRefused as err:
            raise EngineInputError(str(err)) from None
        forced = None if layout is None else Layout.from_dict(layout, len(req.prompts))
        self.params, weights_key = self.loras.use(loras)
        self.references.use_weights(weights_key, self.params)  # cached reference K/V are per weights
        step_cache = step_cache_settings.resolve(
            acceleration,
            accelerator_options,
            steps=req.steps,
            distilled=self.distilled,
            coefficients=self.source.defaults.get("teacache_coefficients"),
        )
        replay = (layout or {}).get("step_cache_computed")
        if step_cache is not None and replay is not None:
            if len(replay) != req.steps or set(replay) - {"0", "1"}:
                raise EngineInputError(
                    f"layout: step_cache_computed must be {req.steps} characters 0/1; got {replay!r}"
                )
            step_cache = dataclasses.replace(step_cache, replay=replay)
        length = int(max_sequence_length or self.max_sequence_length)
        timings = dict.fromkeys(STAGES, 0.0)
        images: list[np.ndarray | None] = [None] * len(req.prompts)
        layouts: list[dict] = [{}] * len(req.prompts)
        cache_records: list[dict] = [{}] * len(req.prompts)

        start = time.perf_counter()
        txt = jax.block_until_ready(self.prompts.embeddings(req.prompts, length))
        neg = None
        if req.guidance is not None:
            neg = jax.block_until_ready(self.prompts.embeddings(req.negative_prompts, length))
        timings["text"] += time.perf_counter() - start

        start = time.perf_counter()
        ref_sets = self._prepared_sets(req.references)
        timings["references"] += time.perf_counter() - start

        sizes = [self._output_size(req, refs) for refs in ref_sets]
        for size in dict.fromkeys(sizes):  # one loop per output size (one, for a plan batch)
            idx = np.asarray([i for i, s in enumerate(sizes) if s == size])
            out, used, record = self._generate_batch(
                req,
                idx,
                size,
                [ref_sets[i] for i in idx],
                _take_rows(txt, idx),
                None if neg is None else _take_rows(neg, idx),
                choice,
                forced,
                on_step,
                timings,
                step_cache,
            )
            for position, item in enumerate(idx):
                images[item], layouts[item], cache_records[item] = out[position], used.as_dict(), record
                layouts[item]["mesh"] = self.mesh_text  # recorded, not hashed: a mesh changes summation order only
                if record:  # what regen replays (the decisions depend on the batch mates)
                    layouts[item]["step_cache_computed"] = "".join("1" if c else "0" for c in record["computed"])
        filled = cast(list[np.ndarray], images)  # every row is in one size group, so every slot is set
        return GenerateOutput(
            filled,
            {k: round(v, 6) for k, v in timings.items()},
            layouts,
            cache_records if step_cache is not None else [],
        )

    def img2img(
        self,
        images,
        prompts,
        strength: float,
        steps: int | None = None,
        seeds=None,
        guidance: float | None = None,
        negative_prompts=None,
        max_sequence_length: int | None = None,
        *,
        scheduler: str | None = None,
        loras=None,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerateOutput:
        """Refine images (SDEdit, as diffusers' Flux2KleinInpaintPipeline starts its loop): encode
        each image, noise its latents from its seed to the schedule's sigma at index
        `img2img_start(strength, steps)`, sample the remaining steps, decode.

        images: one (H, W, 3) uint8 array per prompt, all one size, H and W multiples of 16.
        strength in [0, 1]: 1 starts from pure noise; when no step remains (strength 0) the images
        come back unchanged. The other arguments are as in `generate` (no references, no step caches).
        """
        pixels = _img2img_images(images, len(prompts) if isinstance(prompts, (list, tuple)) else 1)
        height, width = pixels.shape[1:3]
        req = check_request(
            prompts,
            None,
            width,
            height,
            steps,
            seeds,
            None,
            guidance,
            negative_prompts,
            distilled=self.distilled,
            default_steps=self.default_steps,
            default_guidance=self.default_guidance,
        )
        if req.seeds is None:
            raise EngineInputError("img2img: give seeds (one per prompt): they draw the noise added to each image")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise EngineInputError(f"strength: {strength!r} is not allowed; use a number from 0 to 1")
        try:
            choice = names.resolve(scheduler)
        except names.SchedulerRefused as err:
            raise EngineInputError(str(err)) from None
        timings = dict.fromkeys(("text", "encode", "denoise", "decode"), 0.0)
        start_index = img2img_start(strength, req.steps)
        if start_index >= req.steps:  # nothing to sample: the images are the answer
            return GenerateOutput([image.copy() for image in pixels], timings, [{}] * len(pixels))
        h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        sigmas = choice.sigmas(req.steps, h * w)[start_index:]
        self.params, _ = self.loras.use(loras)
        length = int(max_sequence_length or self.max_sequence_length)

        start = time.perf_counter()
        texts = self.prompts.embeddings(req.prompts, length)
        negatives = None if req.guidance is None else self.prompts.embeddings(req.negative_prompts, length)
        texts, negatives = jax.block_until_ready((texts, negatives))
        timings["text"] += time.perf_counter() - start

        start = time.perf_counter()
        latents = self.vae.encode(2.0 * (pixels.astype(np.float32) / 255.0) - 1.0)  # as images.prepare_reference
        noise = _seed_noises(seed_words(req.seeds), tuple(latents.shape[1:]))
        sigma = jnp.float32(sigmas[0])
        x = pack((sigma * noise + (1.0 - sigma) * latents).astype(self.dtype))  # diffusers' scale_noise
        jax.block_until_ready(x)
        timings["encode"] += time.perf_counter() - start

        start = time.perf_counter()
        cond = Conditioning(
            texts,
            self.transformer.rope(text_ids(texts.shape[1])),
            self.transformer.rope(image_ids(h, w)),
            neg=negatives,
        )
        self.counters["img2img"] += 1
        tokens = self.denoiser(
            self.params,
            x,
            cond,
            sigmas,
            choice.sampler(),
            noise_keys(req.seeds),
            req.guidance,
            quantize_t=self.dtype == jnp.bfloat16,
            on_step=on_step,
        )
        timings["denoise"] += time.perf_counter() - start

        start = time.perf_counter()
        out = to_host(self.vae.decode(_token_latents(tokens, h, w)))
        timings["decode"] += time.perf_counter() - start
        return GenerateOutput(list(out), {k: round(v, 6) for k, v in timings.items()}, [{}] * len(out))

    @property
    def mesh_text(self) -> str:
        """The device mesh this pipeline runs on, as recorded: `data=8,model=1` (one device: data=1,model=1)."""
        return "data=1,model=1" if self.placement is None else self.placement.text

    def own_rows(self, rows: int) -> list[int]:
        """The rows of a batch of `rows` that this process's devices compute (all of them but when the
        mesh spans several processes: `Placement.row_owners`). Every process gets every image back;
        this is who keeps which."""
        if self.placement is None or self.placement.processes == 1:
            return list(range(rows))
        me = jax.process_index()
        return [row for row, owner in enumerate(self.placement.row_owners(rows)) if owner == me]

    def clear_caches(self) -> None:
        """Drop cached prompt embeddings, reference latents and reference K/V (frees device memory)."""
        self.prompts.clear()
        self.references.clear()

    def identity(self) -> dict[str, Any]:
        """What determines this pipeline's images besides the request (for manifests)."""
        import flowgen

        return {
            "model": self.source.name,
            "card": self.source.identity,  # what the plan hashed (card facts only)
            "weights": self.source.weights,  # digests of the files loaded (recorded, not hashed)
            "kv": self.is_kv,
            "distilled": self.distilled,
            "flowgen": flowgen.__version__,
            "jax": jax.__version__,
            "dtype": self.dtype.name,
            "attention": self.transformer.attention or self.runtime.attention,
            "device_kind": jax.devices()[0].device_kind,
            "mesh": self.mesh_text,  # recorded, not hashed (see layouts)
            "max_sequence_length": self.max_sequence_length,
        }

    # ---- internals -----------------------------------------------------------------------------

    def _generate_batch(
        self,
        req: Request,
        idx: np.ndarray,
        size: tuple[int, int],
        ref_sets,
        txt,
        neg,
        choice,
        forced: Layout | None,
        on_step,
        timings,
        step_cache=None,
    ) -> tuple[list, Layout, dict]:
        """Rows of one output size: one sampling loop, one decode (and the step cache's record)."""
        height, width = size
        h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
        channels = self.transformer.config.in_channels

        start = time.perf_counter()
        refs = batch_references(
            ref_sets, self.references, kv_model=self.is_kv, fixed_keys=txt.shape[1] + h * w, forced=forced
        )
        x_ids = image_ids(h, w)
        if refs.ref_ids is None:
            rope_img = self.transformer.rope(x_ids)
        elif refs.ref_ids.ndim == 2:
            rope_img = self.transformer.rope(np.concatenate([x_ids, refs.ref_ids]))
        else:  # per-row reference positions
            rope_img = self.transformer.rope_rows([np.concatenate([x_ids, ids]) for ids in refs.ref_ids])
        lengths = None if refs.key_lengths is None else jax.device_put(refs.key_lengths)  # a transfer, no program
        jax.block_until_ready((refs.ref_kv, refs.ref_tokens))
        timings["references"] += time.perf_counter() - start

        start = time.perf_counter()
        x, keys = self._initial_draws(req, idx, (channels, h, w))
        sigmas = choice.sigmas(req.steps, h * w)
        cond = Conditioning(
            txt, self.transformer.rope(text_ids(txt.shape[1])), rope_img, refs.ref_kv, refs.ref_tokens, lengths, neg
        )
        self.counters["denoise"] += 1
        out = self.denoiser(
            self.params,
            x,
            cond,
            sigmas,
            choice.sampler(),
            keys,
            req.guidance,
            quantize_t=self.dtype == jnp.bfloat16,
            on_step=on_step,
            step_cache=step_cache,
        )
        record = {}
        if step_cache is None:
            tokens = out
        else:  # with a step cache the denoiser also says which steps it computed
            tokens, trace = out
            record = {
                **step_cache.as_dict(),
                "distances": trace["distances"].tolist(),
                "computed": trace["computed"].tolist(),
            }
        timings["denoise"] += time.perf_counter() - start

        start = time.perf_counter()
        pixels = to_host(self.vae.decode(_token_latents(tokens, h, w)))  # every row, every process
        timings["decode"] += time.perf_counter() - start
        return list(pixels), refs.layout, record

    def _prepared_sets(self, references: Sequence) -> list[PreparedSet | None]:
        """Each row's references prepared (None: none). Rows holding the very same image objects (a
        set shared by the batch, a run's decoded packshot on several rows) are prepared, and content-
        hashed, once."""
        prepared: dict[tuple[int, ...], PreparedSet] = {}
        sets: list[PreparedSet | None] = []
        for row, images in enumerate(references):
            if not images:
                sets.append(None)
                continue
            key = tuple(map(id, images))  # the objects are alive for the whole call: ids are theirs
            if key not in prepared:
                self.counters["reference_prepare"] += 1
                prepared[key] = prepare_set(images, label=f"references[{row}]: ")
            sets.append(prepared[key])
        return sets

    def _output_size(self, req: Request, refs: PreparedSet | None) -> tuple[int, int]:
        """(height, width): as given, else the first reference's prepared size, else the card's default."""
        default_h, default_w = default_output_size(refs.first_size if refs else None)
        if refs is None:
            default_h = self.source.defaults.get("height", default_h)
            default_w = self.source.defaults.get("width", default_w)
        return req.height or default_h, req.width or default_w

    def _initial_draws(self, req: Request, idx: np.ndarray, shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
        """Packed initial noise (B, h·w, C) in the pipeline dtype, from seeds or given latents, and
        the stochastic samplers' keys (from the seeds; with given latents, from the row numbers)."""
        if req.latents is not None:
            latents = req.latents[idx]
            if latents.shape[1:] != shape:
                raise EngineInputError(
                    f"latents: expected (B, {', '.join(map(str, shape))}) for this output size; got {req.latents.shape}"
                )
            return _latent_tokens(latents.astype(np.float32), self.dtype), noise_keys([int(i) for i in idx])
        seeds = req.seeds
        assert seeds is not None  # check_request: exactly one of seeds and latents
        return _seed_draws(seed_words([seeds[i] for i in idx]), shape, self.dtype)

    def _check_compatible(self, text_encoder) -> None:
        cfg = self.transformer.config
        if text_encoder.output_size != cfg.context_in_dim:
            raise CheckpointError(
                f"{self.source.root}: text encoder gives {text_encoder.output_size}-wide embeddings "
                f"but the transformer expects {cfg.context_in_dim}"
            )
        if self.vae.config.token_channels != cfg.in_channels:
            raise CheckpointError(
                f"{self.source.root}: the VAE makes {self.vae.config.token_channels}-channel latents "
                f"but the transformer expects {cfg.in_channels}"
            )


def _take_rows(array: jax.Array, idx: np.ndarray) -> jax.Array:
    """Rows `idx` of `array`: the array itself when they are all its rows in order (one output size,
    the usual case: no gather program)."""
    return array if np.array_equal(idx, np.arange(array.shape[0])) else array[idx]
