"""The CPU channel norm computes diffusers' QwenImageRMS_norm, up to float rounding."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

from qwenserve.catalog import get_model
from qwenserve.runtime import Engine
from qwenserve.runtime.cpu_kernels import use_fast_vae_norms

NORM_TOLERANCE = 1e-5
"""Max |fast - stock| over a decoded image in [-1, 1]: the two sum in different orders
(measured ~1e-7 per norm; after the decoder's convolutions, below 1e-5)."""


def _vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_norm_matches_the_stock_forward(channel_first: bool, dtype: torch.dtype) -> None:
    norm = QwenImageRMS_norm(6, channel_first=channel_first, images=True).to(dtype)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    shape = (3, 6, 17, 19) if channel_first else (3, 17, 19, 6)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[0] = 0  # an all-zero vector: eps keeps it finite, as in F.normalize
    stock = norm(x)
    assert use_fast_vae_norms(norm) == 1
    fast = norm(x)
    assert fast.dtype == stock.dtype and torch.isfinite(fast).all()
    # Relative, as float rounding is: outputs reach ~4, where one bf16 step is 2**-6 (CI once
    # failed an absolute 1e-2 on exactly that). The stock path rounds to bf16 after each of its
    # three ops, so two steps apart is still equal: torch's bf16 default (rtol 1.6e-2) allows it,
    # and over 2,000 random inputs the worst was 1.2e-2.
    rtol = 1e-5 if dtype is torch.float32 else 1.6e-2
    torch.testing.assert_close(fast, stock, rtol=rtol, atol=1e-5)


def test_a_whole_decode_matches_within_tolerance() -> None:
    vae = _vae().eval()
    latents = torch.randn(2, 16, 1, 24, 20)
    with torch.no_grad():
        stock = vae.decode(latents).sample
        swapped = use_fast_vae_norms(vae)
        fast = vae.decode(latents).sample
    assert swapped > 10, "every norm of encoder and decoder"
    assert (fast - stock).abs().max().item() <= NORM_TOLERANCE


def test_the_engine_uses_it_on_a_cpu(engine: Engine) -> None:
    engine.load("qwen-image-edit-fast")
    resident = engine._resident_for(get_model("qwen-image-edit-fast").recipe)
    norms = [m for m in resident.pipe.vae.modules() if isinstance(m, QwenImageRMS_norm)]
    assert norms and all("forward" in vars(m) for m in norms), "instance-level fast forward"
