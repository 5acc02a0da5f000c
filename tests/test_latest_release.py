"""The bugs still open in the latest transformers release, shown there unpatched and gone patched
(``tests/release_check_latest.py``, run in a virtual environment with that release).

- text-only-output-properties (5.24.0 on): ``image_hidden_states`` / ``audio_hidden_states`` of Gemma-3, Gemma-3n
  and Gemma-4 outputs raise ``AttributeError`` on a text-only batch; the oracle is 5.23.0, whose fields were
  ``None`` there. With an image, the patched property still gives the pooled features.
- per-layer-inputs-from-embeds (every release): the oracle is the ``input_ids`` path on the same weights.
- flash-attention-image-mask: 5.24.0 on refuse FlashAttention at load, text-only included; patched the load goes
  through (to the missing package here), images are refused at the forward and text runs as sdpa does.
- processor-double-bos (every release): the oracle is ``apply_chat_template(tokenize=True)``, one ``<bos>``.
"""

from __future__ import annotations

import pytest

from rewriter.releases import RELEASES
from tests.conftest import release_check

LATEST = RELEASES[-1]


@pytest.fixture(scope="module")
def result(release_env, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("latest")
    return release_check(release_env(LATEST), "release_check_latest.py", folder / "cache", cwd=folder)


def test_the_check_ran_on_the_latest_release_from_its_shipped_entries(result):
    assert result["transformers"] == LATEST
    assert set(result["origin"].values()) == {"shipped"}


def test_output_properties_raise_unpatched_and_give_none_patched(result):
    unpatched, patched = result["unpatched"]["output_properties"], result["patched"]["output_properties"]
    assert {name.split("OutputWithPast")[0] for name in unpatched} == {
        "Gemma3Model", "Gemma3CausalLM", "Gemma3nModel", "Gemma3nCausalLM", "Gemma4Model", "Gemma4CausalLM"
    }
    assert set(unpatched.values()) == {"AttributeError"}
    assert set(patched.values()) == {None}
    assert result["unpatched"]["forward"] == {
        "gemma4 text-only": "AttributeError", "gemma4 image is the pooled output": True, "gemma3 text-only": "AttributeError"
    }
    assert result["patched"]["forward"] == {
        "gemma4 text-only": None, "gemma4 image is the pooled output": True, "gemma3 text-only": None
    }


def test_inputs_embeds_give_the_logits_of_input_ids_only_patched(result):
    unpatched, patched = result["unpatched"]["inputs_embeds"], result["patched"]["inputs_embeds"]
    assert unpatched["gemma4 bfloat16"] == "RuntimeError" and unpatched["gemma4 float32"] == 0.0
    assert unpatched["gemma3n float32"] > 0.1 and unpatched["gemma3n bfloat16"] > 0.1
    assert patched == dict.fromkeys(unpatched, 0.0)


def test_flash_attention_is_refused_for_images_only_patched(result):
    unpatched, patched = result["unpatched"]["flash_attention"], result["patched"]["flash_attention"]
    assert unpatched["load"] == "ValueError" and patched["load"] == "ImportError"  # refused; then the package's turn
    assert unpatched["image"] > 1e-3 and patched["image"] == "ValueError"
    assert unpatched["text"] < 1e-5 and patched["text"] < 1e-5


def test_processors_put_one_bos_only_patched(result):
    assert result["unpatched"]["processor_bos"] == {"gemma3": 2, "gemma3n": 2}
    assert result["patched"]["processor_bos"] == {"gemma3": 1, "gemma3n": 1}
