"""flash-attention-image-mask: under FlashAttention, Gemma-3 image tokens lose the bidirectional mask over their
image (4.53.0 to 5.23.0, silently); from 5.24.0 loading with FlashAttention is refused, text-only included.

FlashAttention cannot run on this machine, so the tests run transformers' own FlashAttention path (its mask builder,
its dispatch) with a stand-in for the kernel that computes what FlashAttention-2 computes: causal attention over a
2D padding mask (``testing.flash_attention_stand_in``). No release fixes it; the oracle is sdpa on the same weights,
which transformers gets right: text-only inputs give sdpa's logits under FlashAttention, and inputs with images are
refused instead of attending wrongly. The 5.25.0 load check: tests/test_latest_release.py.
"""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import testing

IMAGE_TOKENS = slice(5, 9)  # testing.image_prompt(): <bos> 17 42 <boi> then four image tokens


@pytest.fixture
def model():
    return testing.gemma3_image_model()


def text_inputs() -> dict:
    ids = testing.input_ids(batch=2, length=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, implementation: str, inputs: dict) -> torch.Tensor:
    testing.use_attention(model, implementation)
    with testing.flash_attention_stand_in(), torch.no_grad():
        return model(**inputs).logits


def test_unpatched_flash_attention_silently_drops_the_image_mask(model):
    sdpa = logits(model, "sdpa", testing.gemma3_image_inputs())
    flash = logits(model, "flash_attention_2", testing.gemma3_image_inputs())
    assert (flash - sdpa)[0, IMAGE_TOKENS].abs().max() > 1e-3
    text = text_inputs()  # the stand-in is exact where FlashAttention is: text
    flash, sdpa = logits(model, "flash_attention_2", text), logits(model, "sdpa", text)
    assert torch.allclose(flash[text["attention_mask"].bool()], sdpa[text["attention_mask"].bool()], atol=1e-5)


def test_patched_flash_attention_refuses_images_and_runs_text_as_sdpa(model, cache_dir):
    report = rewriter.compile("gemma3", cache_dir=cache_dir, strict=True)
    assert report.outcome("flash-attention-image-mask").status == "applied"
    with pytest.raises(ValueError, match="Flash Attention cannot"):
        logits(model, "flash_attention_2", testing.gemma3_image_inputs())
    with pytest.raises(ValueError, match="Flash Attention cannot"):  # image token types without the pixels
        logits(model, "flash_attention_2", {key: testing.gemma3_image_inputs()[key] for key in ("input_ids", "token_type_ids")})
    text = text_inputs()
    flash, sdpa = logits(model, "flash_attention_2", text), logits(model, "sdpa", text)
    assert torch.allclose(flash[text["attention_mask"].bool()], sdpa[text["attention_mask"].bool()], atol=1e-5)
    testing.use_attention(model, "flash_attention_2")
    with testing.flash_attention_stand_in(), torch.no_grad():
        generated = model.generate(**text, max_new_tokens=4, do_sample=False)
    testing.use_attention(model, "sdpa")
    assert torch.equal(generated, model.generate(**text, max_new_tokens=4, do_sample=False))
    assert torch.isfinite(logits(model, "sdpa", testing.gemma3_image_inputs())).all()  # sdpa keeps images
