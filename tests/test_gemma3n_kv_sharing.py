"""Gemma-3n's KV-shared layers compute their own K/V when there is no cache: wrong logits, wrong training loss.

The oracle is transformers 5.24.0, which fixed it natively: ``fixtures/gemma3n_kv_sharing_reference.pt`` holds its
weights, an input, its logits and greedy tokens, and the loss and gradients of a gradient-checkpointed step
(``fixtures/make_gemma3n_kv_sharing_reference.py`` regenerates it). The releases before 4.56.0 have another shape
of the bug; ``tests/test_releases.py`` runs these behaviours on them end to end.

The fixture was computed on one CPU; on another, MKL's float32 kernels for its instruction set (AVX2, AVX-512) sum
in another order, so the oracle's figures hold up to float32 rounding (1.2e-6 in logits and 5.5e-6 in gradients
between an AMD EPYC and an Intel Xeon), where the bug moves logits by 0.34. On the machine running the test,
patched outputs with and without a cache are the same to the last bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, Gemma3nForCausalLM
from transformers.models.gemma3n import modeling_gemma3n

import rewriter
from rewriter import testing
from tests.conftest import mutated_transformers, shared_layers_weights_are_gone

REFERENCE = torch.load(Path(__file__).with_name("fixtures") / "gemma3n_kv_sharing_reference.pt", weights_only=True)
SHARED_LAYERS = (4, 5)


@pytest.fixture
def patched(cache_dir) -> rewriter.CompileReport:
    """Gemma-3n patched (conftest's ``patched`` is Gemma-4's); conftest restores every family after each test."""
    return rewriter.compile("gemma3n", cache_dir=cache_dir, strict=True)


@pytest.fixture
def model() -> Gemma3nForCausalLM:
    """The installed release's model holding the oracle's weights."""
    model = testing.text_model("gemma3n")
    missing, unexpected = model.load_state_dict(REFERENCE["state_dict"], strict=False)
    # The oracle drops the K/V projections that shared layers never use: exactly those keys are missing.
    assert unexpected == []
    assert sorted(missing) == sorted(
        f"model.layers.{i}.self_attn.{name}.weight" for i in SHARED_LAYERS for name in ("k_proj", "v_proj", "k_norm")
    )
    return model


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(REFERENCE["input_ids"], **kwargs).logits


def test_reference_comes_from_a_release_with_the_native_fix():
    assert tuple(int(part) for part in REFERENCE["transformers"].split(".")[:2]) >= (5, 6)


def test_unpatched_use_cache_false_differs_from_the_oracle(model):
    torch.testing.assert_close(logits(model, use_cache=True), REFERENCE["logits"])
    assert (logits(model, use_cache=False) - REFERENCE["logits"]).abs().max() > 0.1


def test_patched_logits_equal_the_oracle_with_and_without_cache(model, patched):
    assert patched.outcome("kv-sharing-without-cache").status == "applied"
    cached = logits(model, use_cache=True)
    torch.testing.assert_close(cached, REFERENCE["logits"])
    assert torch.equal(logits(model, use_cache=False), cached)
    model.train()
    assert torch.equal(logits(model), cached)


def test_patched_generate_gives_the_oracle_tokens_with_dynamic_and_static_caches(model, patched):
    ids = REFERENCE["input_ids"]
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), REFERENCE["generated"])
    static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(static, REFERENCE["generated"])


def test_no_cache_is_returned(model, patched):
    with torch.no_grad():
        assert model(REFERENCE["input_ids"], use_cache=False).past_key_values is None


def checkpointed_step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = REFERENCE["input_ids"]
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_unpatched_gradient_checkpointing_trains_on_another_loss(model):
    loss, _ = checkpointed_step(model)
    assert abs(loss - REFERENCE["loss"]) > 1e-3


def test_patched_gradient_checkpointing_gives_the_oracle_loss_and_gradients(model, patched):
    loss, grads = checkpointed_step(model)
    torch.testing.assert_close(loss, REFERENCE["loss"])
    assert grads.keys() == REFERENCE["grads"].keys()  # the unused K/V projections of shared layers get none
    for name, grad in grads.items():
        torch.testing.assert_close(grad, REFERENCE["grads"][name], rtol=1e-5, atol=1e-5, msg=name)


# bitsandbytes on the CPU quantizes linears at least 64 wide whose outputs it can pack: keep the others in float.
QLORA_WIDTHS = dict(hidden_size=128, intermediate_size=256, head_dim=64, hidden_size_per_layer_input=64, laurel_rank=64)
FLOAT_MODULES = ["lm_head", "modality_router", "correction_coefs", "prediction_coefs", "per_layer_model_projection"]


@pytest.fixture(scope="module")
def qlora_checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gemma3n")
    torch.manual_seed(0)
    Gemma3nForCausalLM(testing.gemma3n_text_config(**QLORA_WIDTHS)).save_pretrained(folder)
    return str(folder)


def cached_loss_and_first_step(checkpoint: str) -> tuple[float, float]:
    """The loss of a batch with a cache (the oracle), then the loss of a QLoRA training step on it."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=FLOAT_MODULES
    )
    model = Gemma3nForCausalLM.from_pretrained(checkpoint, quantization_config=quantization, device_map="cpu")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    batch = testing.input_ids(batch=2, length=16)
    model.eval()
    with torch.no_grad():
        oracle = model(input_ids=batch, labels=batch, use_cache=True).loss.item()
    model.train()
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    return oracle, loss.item()


def test_unpatched_qlora_first_step_trains_on_another_loss(qlora_checkpoint):
    oracle, first = cached_loss_and_first_step(qlora_checkpoint)
    assert abs(first - oracle) > 1e-3


def test_patched_qlora_first_step_loss_is_the_cached_loss(qlora_checkpoint, patched):
    oracle, first = cached_loss_and_first_step(qlora_checkpoint)
    assert first == oracle


def test_a_restructured_store_is_drift_and_strict_installs_nothing(tmp_path, monkeypatch):
    target = "models/gemma3n/modeling_gemma3n.py"
    mutated_transformers(
        tmp_path / "src",
        monkeypatch,
        target,
        "past_key_values.shared_layers[self.layer_idx] = key_states, value_states",
        "past_key_values.shared_layers.update({self.layer_idx: (key_states, value_states)})",
    )
    forward = modeling_gemma3n.Gemma3nTextAttention.forward.__code__
    rotary = modeling_gemma3n.Gemma3nRotaryEmbedding.__init__.__code__
    with pytest.raises(rewriter.RuleDriftError, match=f"rule 'kv-sharing-without-cache' drifted in {target}: expected"):
        rewriter.compile("gemma3n", cache_dir=tmp_path / "cache", strict=True)
    assert modeling_gemma3n.Gemma3nRotaryEmbedding.__init__.__code__ is rotary
    report = rewriter.compile("gemma3n", cache_dir=tmp_path / "cache")
    statuses = {o.rule: o.status for o in report.outcomes}
    assert statuses == {
        "rotary-buffer-order": "applied",
        "rotary-compute-order": "not_needed",
        "kv-sharing-without-cache": "drift",
        "kv-sharing-fsdp2": "drift",  # what it rewrites is the dict the drifted rule would have inserted
        "per-layer-inputs-from-embeds": "applied",
        "loss-accumulation": "applied",
        "text-only-output-properties": "not_needed",  # a property from 5.24.0
        "placeholder-mask-defaults": "not_needed",  # 4.55.0 only
        "audio-outputs-collision": "not_needed",  # 5.0.0 to 5.2.0
        "processor-double-bos": "applied",
    }
    assert modeling_gemma3n.Gemma3nTextAttention.forward.__code__ is forward
    assert modeling_gemma3n.Gemma3nRotaryEmbedding.__init__.__code__ is not rotary


def test_patched_shared_layers_build_no_kv_weights_as_the_oracle(cache_dir, tmp_path):
    shared_layers_weights_are_gone("gemma3n", REFERENCE, tmp_path / "checkpoint", cache_dir)
