"""processor-double-bos: a prompt rendered by ``apply_chat_template(..., tokenize=False)`` starts with ``<bos>``, and
the processor's tokenizer added a second one.

No release fixes it (5.25.0 included: tests/test_latest_release.py), so the oracle is the path upstream gets right:
``apply_chat_template(..., tokenize=True)``, which tokenizes the same prompt without adding special tokens.
"""

from __future__ import annotations

import pytest
from PIL import Image

import rewriter
from rewriter import testing
from tests.conftest import run_python

FAMILIES = ["gemma3", "gemma3n"]
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "w1 w2 w3"}]}]
BOS = 2


def rendered_and_tokenized(processor) -> tuple[str, list[int]]:
    """The prompt as text, and as the oracle tokenizes it."""
    prompt = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return prompt, processor.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatched_processor_puts_bos_twice(family):
    processor = testing.processor(family)
    prompt, oracle = rendered_and_tokenized(processor)
    assert prompt.startswith("<bos>") and oracle[:2] == [BOS, 4]
    assert processor(text=prompt)["input_ids"][0] == [BOS, *oracle]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_processor_tokenizes_a_rendered_prompt_as_apply_chat_template_does(family, cache_dir):
    report = rewriter.compile(family, cache_dir=cache_dir, strict=True)
    assert report.outcome("processor-double-bos").status == "applied"
    processor = testing.processor(family)
    prompt, oracle = rendered_and_tokenized(processor)
    assert processor(text=prompt)["input_ids"][0] == oracle
    assert processor(text=[prompt, prompt])["input_ids"] == [oracle, oracle]
    # text without <bos> still gets one, and an explicit choice is kept
    assert processor(text="w1 w2")["input_ids"][0] == [BOS, *processor.tokenizer.convert_tokens_to_ids(["w1", "w2"])]
    assert processor(text=prompt, add_special_tokens=True)["input_ids"][0] == [BOS, *oracle]


def test_patched_gemma3_processor_with_an_image_puts_bos_once(cache_dir):
    rewriter.compile("gemma3", cache_dir=cache_dir, strict=True)
    processor = testing.processor("gemma3")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (32, 32))
    inputs = processor(text=prompt, images=[image])
    assert inputs["input_ids"][0] == processor(text=prompt, images=[image], add_special_tokens=False)["input_ids"][0]
    assert inputs["input_ids"][0][:2] == [BOS, 4] and inputs["token_type_ids"][0].count(1) == 4


def test_compile_on_import_patches_a_program_that_imports_only_the_processor(cache_dir):
    """Data preparation often imports the processor alone, before (or without) any model."""
    code = f"""
import rewriter
from rewriter import testing
from tests.conftest import run_python

rewriter.compile_on_import(cache_dir={str(cache_dir)!r})
processor = testing.processor("gemma3")
prompt = processor.apply_chat_template({MESSAGES!r}, tokenize=False)
print(rewriter.compiled("gemma3").outcome("processor-double-bos").status, processor(text=prompt)["input_ids"][0][:2])
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == f"applied [{BOS}, 4]"
