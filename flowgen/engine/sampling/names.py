"""The spec's 75 scheduler names -> (sampler, sigma schedule). JAX-free: the recipe layer reads it.

    choice = resolve("DPM++ 2M Karras")      # SchedulerChoice, or SchedulerRefused (one-line message)
    choice.sampler()                          # a sampling.base.Sampler (imports JAX)
    choice.sigmas(steps, image_seq_len)       # (steps + 1,) float32, ending in 0

How a name reads (docs/recipes.md has the whole table):

* ComfyUI-style names "<sampler> [<schedule>]" run that k-diffusion / ComfyUI sampler on the flow
  model as ComfyUI does (x0 = x − σ·v) over the named schedule (`schedules.py`): no suffix is Klein's
  Default schedule; Karras, Exponential, Beta, Uniform re-space it between the same end points. In
  the "<family> Uniform <schedule>" names (DPM++ / IPNDM / UniPC Uniform Karras, ...) the trailing
  schedule word decides the sigmas, so "DPM++ Uniform Karras" runs as "DPM++ Karras".
  "DPM++" alone is DPM++ 2M; "UniPC" alone is UniPC 2M (diffusers' default order).
* diffusers class names run diffusers' flow variant of that scheduler where diffusers has one
  (FlowMatchEuler, FlowMatchHeun, DPMSolverMultistep / Singlestep, DEIS, FlowMatchLCM with
  `use_flow_sigmas`), and otherwise what the scheduler's update is on a flow model (DDIM with η = 0 is
  exactly the Euler step; DDPM's posterior step is DPM-Solver++ SDE first order; EDM's are Karras).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT = "Default"


class SchedulerRefused(ValueError):
    """A scheduler name the engine does not run; the message is one line naming what is supported."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"scheduler {name!r} is not supported: {reason}")


# sampler name -> (module under flowgen.engine.sampling, class, keyword arguments, stochastic)
SAMPLERS: dict[str, tuple[str, str, dict, bool]] = {
    "euler": ("base", "FlowEuler", {}, False),
    "euler_ancestral": ("samplers", "EulerAncestralRF", {}, True),
    "heun": ("samplers", "Heun", {}, False),
    "dpm_2": ("samplers", "DPM2", {}, False),
    "dpm_2_ancestral": ("samplers", "DPM2AncestralRF", {}, True),
    "dpmpp_sde": ("samplers", "DPMPPSDE", {}, True),
    "lcm": ("samplers", "FlowTCD", {"gamma": 1.0}, True),
    "tcd": ("samplers", "FlowTCD", {"gamma": 0.3}, True),
    "lms": ("multistep", "LMS", {"order": 4}, False),
    "ipndm": ("multistep", "IPNDM", {}, False),
    "dpmpp_2m": ("multistep", "DPMSolverPP", {"order": 2}, False),
    "dpmpp_3m": ("multistep", "DPMSolverPP", {"order": 3}, False),
    "dpmpp_2m_sde": ("multistep", "DPMSolverPP", {"order": 2, "eta": 1.0, "flow": True}, True),
    "dpmpp_3m_sde": ("multistep", "DPMSolverPP", {"order": 3, "eta": 1.0, "flow": True}, True),
    "dpmsolver_multistep": ("multistep", "DPMSolverPP", {"order": 2, "flow": True}, False),
    "ddpm": ("multistep", "DPMSolverPP", {"order": 1, "eta": 1.0, "flow": True}, True),
    "dpmsolver_singlestep": ("multistep", "DPMSolverSinglestep", {}, False),
    "deis": ("multistep", "DEIS", {"order": 2}, False),
    "unipc": ("multistep", "UniPC", {"order": 2}, False),
    "unipc_3m": ("multistep", "UniPC", {"order": 3}, False),
}

# What each sampler is, in words (docs/recipes.md's table says the same).
SAMPLER_NOTES: dict[str, str] = {
    "euler": "Klein's flow Euler x + (σ' − σ)·v (k-diffusion sample_euler; diffusers FlowMatchEulerDiscrete)",
    "euler_ancestral": "ComfyUI sample_euler_ancestral_RF (η = 1)",
    "heun": "k-diffusion sample_heun (diffusers FlowMatchHeunDiscrete); 2 model calls per step",
    "dpm_2": "k-diffusion sample_dpm_2; 2 model calls per step",
    "dpm_2_ancestral": "ComfyUI sample_dpm_2_ancestral_RF (η = 1); 2 model calls per step",
    "dpmpp_sde": "ComfyUI sample_dpmpp_sde, flow (half-log-SNR) form, η = 1, r = ½; 2 model calls per step",
    "lcm": "LCM: x0, then re-noise to σ' (diffusers FlowMatchLCM)",
    "tcd": "TCD, γ = 0.3: Euler to (1 − γ)·σ', then re-noise to σ'",
    "lms": "k-diffusion sample_lms (order 4), last step denoises (ComfyUI)",
    "ipndm": "ComfyUI sample_ipndm (order 4, fixed weights)",
    "dpmpp_2m": "k-diffusion sample_dpmpp_2m (as ComfyUI dpmpp_2m)",
    "dpmpp_3m": "k-diffusion sample_dpmpp_3m_sde with η = 0",
    "dpmpp_2m_sde": "ComfyUI sample_dpmpp_2m_sde, flow form, η = 1, midpoint",
    "dpmpp_3m_sde": "ComfyUI sample_dpmpp_3m_sde, flow form, η = 1",
    "dpmsolver_multistep": "diffusers DPMSolverMultistep, flow sigmas: DPM-Solver++ 2M midpoint",
    "ddpm": "DDPM posterior step on a flow model = DPM-Solver++ SDE order 1 (diffusers sde-dpmsolver++)",
    "dpmsolver_singlestep": "diffusers DPMSolverSinglestep, flow sigmas: DPM-Solver++ 2S",
    "deis": "diffusers DEISMultistep, flow sigmas: log-ρ DEIS order 2, ending at σ = 0",
    "unipc": "diffusers UniPCMultistep, flow sigmas: bh2, order 2",
    "unipc_3m": "diffusers UniPCMultistep, flow sigmas: bh2, order 3",
}

_SUFFIX = {"": "default", " Karras": "karras", " Exponential": "exponential", " Beta": "beta", " Uniform": "uniform"}


def _family(prefix: str, sampler: str, suffixes) -> dict[str, tuple[str, str]]:
    return {f"{prefix}{s}": (sampler, _SUFFIX[s]) for s in suffixes}


_ALL = ("", " Karras", " Exponential", " Beta", " Uniform")
_TABLE: dict[str, tuple[str, str]] = {
    "Default": ("euler", "default"),
    "FlowMatchEulerDiscreteScheduler": ("euler", "default"),
    "EulerDiscreteScheduler": ("euler", "default"),
    "DDIM": ("euler", "default"),
    "DDIMScheduler": ("euler", "default"),
    **_family("Euler", "euler", ("", " Karras", " Exponential", " Beta")),
    "EDMEulerScheduler": ("euler", "karras"),
    "Euler a": ("euler_ancestral", "default"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "default"),
    **_family("Heun", "heun", ("", " Karras")),
    "HeunDiscreteScheduler": ("heun", "default"),
    "KDPM2DiscreteScheduler": ("dpm_2", "default"),
    "KDPM2AncestralDiscreteScheduler": ("dpm_2_ancestral", "default"),
    **_family("LMS", "lms", ("", " Karras")),
    "LMSDiscreteScheduler": ("lms", "default"),
    **_family("DPM++", "dpmpp_2m", _ALL),
    **_family("DPM++ Uniform", "dpmpp_2m", (" Karras", " Exponential", " Beta")),
    **_family("DPM++ 2M", "dpmpp_2m", _ALL),
    "EDMDPMSolverMultistepScheduler": ("dpmpp_2m", "karras"),
    **_family("DPM++ 3M", "dpmpp_3m", _ALL),
    **_family("DPM++ 2M SDE", "dpmpp_2m_sde", _ALL),
    "DPM++ 3M SDE Uniform": ("dpmpp_3m_sde", "uniform"),
    **_family("DPM++ SDE", "dpmpp_sde", ("", " Karras", " Exponential", " Beta")),
    "DPMSolverMultistepScheduler": ("dpmsolver_multistep", "diffusers_flow"),
    "DPMSolverSinglestepScheduler": ("dpmsolver_singlestep", "diffusers_flow"),
    "DEISMultistepScheduler": ("deis", "diffusers_flow"),
    "DDPMScheduler": ("ddpm", "default"),
    "IPNDMScheduler": ("ipndm", "default"),
    "PNDMScheduler": ("ipndm", "default"),
    "IPNDM Uniform": ("ipndm", "uniform"),
    **_family("IPNDM Uniform", "ipndm", (" Karras", " Exponential", " Beta")),
    "LCM": ("lcm", "default"),
    "LCMScheduler": ("lcm", "default"),
    "TCDScheduler": ("tcd", "default"),
    **_family("UniPC", "unipc", ("", " Karras", " Uniform")),
    **_family("UniPC Uniform", "unipc", (" Karras", " Exponential", " Beta")),
    **_family("UniPC 2M", "unipc", ("", " Karras", " Uniform")),
    **_family("UniPC 3M", "unipc_3m", ("", " Karras", " Uniform")),
}

# Spec names the engine refuses, with why (one line each).
REFUSED: dict[str, str] = {
    "DPMSolverMultistepInverse": (
        "it inverts an image into noise, σ rising from 0 to 1, and flowgen only samples from noise; "
        "use 'DPMSolverMultistepScheduler' or any other spec scheduler name"
    ),
}

SUPPORTED = tuple(_TABLE)


@dataclass(frozen=True)
class SchedulerChoice:
    name: str  # the spec name as given
    sampler_name: str  # a key of SAMPLERS, e.g. "dpmpp_2m"
    schedule_name: str  # a key of schedules.SCHEDULES, e.g. "karras" ("default": Klein's shifted schedule)

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise (then each row needs its noise key)."""
        return SAMPLERS[self.sampler_name][3]

    def sampler(self):
        import importlib

        module, cls, kwargs, _ = SAMPLERS[self.sampler_name]
        return getattr(importlib.import_module(f"flowgen.engine.sampling.{module}"), cls)(**kwargs)

    def sigmas(self, steps: int, image_seq_len: int) -> np.ndarray:
        from flowgen.engine.sampling import schedules

        return schedules.sigmas(self.schedule_name, steps, image_seq_len)


def resolve(name: str | None) -> SchedulerChoice:
    """The choice for a spec scheduler name (None: Default); SchedulerRefused for any other."""
    name = DEFAULT if name is None else name
    if name in REFUSED:
        raise SchedulerRefused(name, REFUSED[name])
    if name not in _TABLE:
        raise SchedulerRefused(name, f"not a scheduler name; use one of {', '.join(SUPPORTED)}")
    return SchedulerChoice(name, *_TABLE[name])
