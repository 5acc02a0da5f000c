"""softcap-sdpa: from 4.53.0 to 5.20.2 a Gemma-2 model built without an ``attn_implementation`` runs SDPA, which
drops ``attn_logit_softcapping``: silently wrong logits.

The oracle is transformers 5.21.0, which fixed it, on the same weights (``testing.gemma2_model``, drawn from a
seeded generator in any release): ``tests/fixtures/softcap_reference.pt`` holds the implementation its default
build chose (eager) and its logits (``tests/fixtures/make_softcap_reference.py`` made them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rewriter
from rewriter import testing

REFERENCE = torch.load(Path(__file__).with_name("fixtures") / "softcap_reference.pt")
REFUSAL = "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(testing.input_ids(batch=2, length=12)).logits


def test_unpatched_default_runs_sdpa_and_drops_the_cap():
    model = testing.gemma2_model()
    assert model.config._attn_implementation == "sdpa"
    assert (logits(model) - REFERENCE["logits"]).abs().max() > 1.0  # 1.35 measured
    assert torch.equal(logits(testing.gemma2_model("eager")), REFERENCE["logits"])  # eager was right all along


def test_patched_default_is_eager_with_the_logits_of_the_fixed_release(cache_dir):
    report = rewriter.compile("gemma2", cache_dir=cache_dir, strict=True)
    assert report.outcome("softcap-sdpa").status == "applied" and REFERENCE["transformers"] == "5.21.0"
    model = testing.gemma2_model()
    assert model.config._attn_implementation == REFERENCE["implementation"] == "eager"
    assert torch.equal(logits(model), REFERENCE["logits"])


def test_patched_explicit_sdpa_is_refused_as_in_the_fixed_release(cache_dir):
    rewriter.compile("gemma2", cache_dir=cache_dir, strict=True)
    with pytest.raises(ValueError, match=REFUSAL):
        testing.gemma2_model("sdpa")


def test_restore_gives_the_class_its_attribute_back(cache_dir):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

    rewriter.compile("gemma2", cache_dir=cache_dir, strict=True)
    assert Gemma2PreTrainedModel._supports_sdpa is False
    rewriter.restore("gemma2")
    assert Gemma2PreTrainedModel._supports_sdpa is True
    assert testing.gemma2_model().config._attn_implementation == "sdpa"
