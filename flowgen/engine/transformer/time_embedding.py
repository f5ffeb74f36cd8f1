"""The frequency table of FLUX.2's sinusoidal timestep embedding, exactly as diffusers computes it.

diffusers' `get_timestep_embedding` (flip_sin_to_cos=True, downscale_freq_shift=0, scale 1,
max_period 10000) builds the table in torch float32 on every call. numpy's and XLA's float32 `exp`
round 54 and 14 of its 128 entries differently (1-2 ulp); times 1000·t that moves the sinusoid
arguments by up to 5.6e-5 rad, and a model with live fast features moves its velocity away from
diffusers' by ~20x diffusers' own float32 error (measured against a float64 diffusers that keeps the
float32 table; against a fully float64 embedding the stored table measures 0.8-1.1x).
Real weights were trained with torch's table, so the 256-dim model uses torch's values, stored bit
for bit.

torch's own table is not the same on every CPU either: its float32 exp is not correctly rounded and
its vector kernels differ (AVX-512 vs AVX2: 5 of the 128 entries differ by 1 ulp). The stored table
is fixed, so flowgen's images do not depend on the host's CPU; each entry is within 1 ulp of the
correctly rounded value (tests/engine/transformer/test_constants.py).
"""

from __future__ import annotations

import math

import numpy as np

# float32 bit patterns (big-endian hex, 8 digits each) of torch 2.13 (CPU) evaluating
#   torch.exp(-math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128)
# i.e. diffusers' exponent = -ln(max_period)·arange(half, float32) / (half - shift), exp'd in float32,
# for embedding_dim 256 → half 128.
_FREQS_128_HEX = (
    "3f8000003f6e39f83f5dafd63f4e4bac3f3ff9113f32a5063f263de03f1ab32b3f0ff59a3f05f6ee3ef953ce3ee80460"
    "3ed7e89a3ec8eb243ebaf81b3eadfcff3ea1e89b3e96aaea3e8c35033e8279083e72d4223e61f8363e5247ed3e43ae7c"
    "3e3618873e2974093e1db03f3e12bd903e088d773dfe24df3dec7fd53ddc14643dcccccc3dbe94c73db159783da50957"
    "3d99940d3d8eea6c3d84fe4c3d7785113d6655c13d5657e33d4776403d399d183d2cba163d20bc1b3d1593483d0b30cb"
    "3d0186e23cf111773ce054d13cd0c1a83cc2434e3cb4c6913ca839893c9c8b963c91ad393c8790093c7c4d303c6ac8e6"
    "3c5a7bf13c4b50b53c3d330e3c3010503c23d70a3c1877063c0de12e3c0407773bf5b9ad3be4aa453bd4ca153bc6040a"
    "3bb8449a3bab79823b9f91cc3b947daf3b8a2e753b80967c3b6f520d3b5eb47a3b4f3e333b40dac23b33770d3b270153"
    "3b1b690d3b109ed83b06946d3afa78f03ae915283ad8e6753ac9d7593abbd3eb3aaec98e3aa2a6f73a975c0b3a8cd9d9"
    "3a83126e3a73f1a23a6301e33a533f243a44948a3a36ee9d3a2a3b443a1e69a23a136a143a092e0139ff4fac39ed95e4"
    "39dd172139cdbd9339bf74d639b229fb39a5cb61399a48a0398f927539859aa43978a80d3967648c395753e2394860c0"
    "393a7753392d852a3921791939164326390bd46d39021f2838f22cdd38e15c8e"
)
_FREQS_128 = np.frombuffer(bytes.fromhex(_FREQS_128_HEX), dtype=">u4").astype(np.uint32).view(np.float32)


def frequencies(half: int) -> np.ndarray:
    """The (half,) float32 frequencies exp(-ln(10000)·i/half), i = 0..half-1.

    half = 128 (every released FLUX.2 model, timestep_dim 256) is torch's table to the bit. Other
    sizes (tiny test models only) exp the same float32 exponent in float64 and round once: within
    1 ulp of torch (3 of the 128 entries above would differ).
    """
    if half == 128:
        return _FREQS_128.copy()
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)
