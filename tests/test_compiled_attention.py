"""Compiled attention with real ``torch.compile`` (inductor on the CPU, the machine's gcc).

Tolerances against eager, float32: logits within 1e-5 (measured: 1e-6); each gradient within 1e-4 of eager's
norm (measured: 1e-5; fused kernels sum in another order); the loss within 1e-5. Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4 import modeling_gemma4

import rewriter
from rewriter import testing
from rewriter.variants import recompile_limit_hits
from tests.conftest import run_python

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def kv_shared_model():
    return testing.causal_lm(2)


def generate(model, **kwargs):
    return model.generate(testing.input_ids(), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def test_naive_compile_of_the_forward_hits_the_recompile_limit(patched, kv_shared_model):
    """The problem: one compiled forward for every layer, cache and phase runs out of recompiles and goes eager."""
    torch._dynamo.reset()
    eager = modeling_gemma4.Gemma4TextAttention.forward
    modeling_gemma4.Gemma4TextAttention.forward = torch.compile(eager, dynamic=True)
    try:
        generate(kv_shared_model)
    finally:
        modeling_gemma4.Gemma4TextAttention.forward = eager
    assert recompile_limit_hits() >= 1
    torch._dynamo.reset()


def test_generate_matches_eager_with_every_cache_and_no_recompile_limit_hit(cache_dir, kv_shared_model):
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager_dynamic, eager_static = generate(kv_shared_model), generate(kv_shared_model, cache_implementation="static")
    with torch.no_grad():
        eager_logits = kv_shared_model(testing.input_ids(), use_cache=False).logits
    torch._dynamo.utils.counters.clear()
    report = rewriter.compile("gemma4", cache_dir=cache_dir, compile_attention=True)
    assert report.attention == "compiled"
    assert torch.equal(generate(kv_shared_model), eager_dynamic)
    assert torch.equal(generate(kv_shared_model, cache_implementation="static"), eager_static)
    with torch.no_grad():
        logits = kv_shared_model(testing.input_ids(), use_cache=False).logits
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5)
    assert recompile_limit_hits() == 0
    graphs = rewriter.attention_graphs("gemma4")
    assert {(g["layer"], g["kv"]) for g in graphs} == {
        (layer, kv) for layer in ("sliding_attention", "full_attention") for kv in ("own", "stores shared", "shared")
    }
    assert {g["cache"] for g in graphs} == {"DynamicCache", "StaticCache", "none"}
    assert all(1 <= g["graphs"] < torch._dynamo.config.recompile_limit for g in graphs)


def test_training_backward_through_compiled_attention(cache_dir):
    model = testing.causal_lm(2).train()
    ids = testing.input_ids()
    rewriter.compile("gemma4", cache_dir=cache_dir)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_attention=True)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert (grad - eager_grads[name]).norm() <= 1e-4 * eager_grads[name].norm(), name


def test_e2b_shaped_generate_has_no_recompile_limit_hit(cache_dir):
    model = testing.causal_lm(20, config=testing.e2b_text_config())
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = generate(model)
    torch._dynamo.utils.counters.clear()
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_attention=True)
    assert torch.equal(generate(model), eager)
    assert recompile_limit_hits() == 0


def test_restore_and_recompiling_without_it_put_eager_attention_back(cache_dir):
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = modeling_gemma4.Gemma4TextAttention.__dict__["forward"]
    assert rewriter.compile("gemma4", cache_dir=cache_dir, compile_attention=True).attention == "compiled"
    assert modeling_gemma4.Gemma4TextAttention.__dict__["forward"] is not eager
    assert rewriter.compile("gemma4", cache_dir=cache_dir).attention == "eager"
    assert modeling_gemma4.Gemma4TextAttention.__dict__["forward"] is eager
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_attention=True)
    rewriter.restore("gemma4")
    assert modeling_gemma4.Gemma4TextAttention.__dict__["forward"] is eager


def test_without_a_compiler_attention_stays_eager_with_one_warning(cache_dir):
    code = f"""
import rewriter
report = rewriter.compile("gemma4", cache_dir={str(cache_dir)!r}, compile_attention=True)
print(report.attention)
"""
    result = run_python(code, env={"CXX": "/nonexistent/g++"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("eager (") and "C++ compiler" in result.stdout and "/nonexistent/g++" in result.stdout
    assert result.stderr.count("attention stays eager") == 1


def test_compile_on_import_gives_compiled_attention_to_the_families_that_have_it(cache_dir):
    """With no family named, the families without compiled attention are patched without it; named, they refuse."""
    import transformers.models.gemma3.modeling_gemma3  # noqa: F401  (imported: compiled at once)

    with pytest.raises(ValueError, match="gemma3 has no compiled attention"):
        rewriter.compile_on_import("gemma3", compile_attention=True)
    reports = rewriter.compile_on_import(cache_dir=cache_dir, compile_attention=True)
    assert (reports["gemma4"].attention, reports["gemma3"].attention) == ("compiled", "eager")
