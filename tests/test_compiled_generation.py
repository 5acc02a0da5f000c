"""Compiled decoding (``compile_decode=``) with real ``torch.compile`` (inductor on the CPU, the machine's gcc).

Greedy tokens through ``model.generate`` must be identical to eager (float32); graphs stay bounded with no
recompile-limit hit, whichever batch sizes ``generate`` sees.
"""

from __future__ import annotations

import collections
import functools
import logging
import sys

import pytest
import torch
from transformers.models.gemma4 import modeling_gemma4

import rewriter
from rewriter import testing
from rewriter.variants import recompile_limit_hits
from tests.conftest import run_python

NEW_TOKENS = 6
PREFIXES = ("forward[forward ", "forward[layer ")  # the code names of compiled decoding's variants
BATCHES = (1, 4)
SHORT = 5  # a prompt shorter than the window (8): the sliding cache fills during decoding


def generate(model, batch: int, length: int = 12):
    """Greedy tokens filling a static cache of one length (18) whatever the prompt's; at batch 4 every other row is
    left-padded, so the padding mask reaches the compiled graphs."""
    ids, new_tokens = testing.input_ids(batch, length), NEW_TOKENS + 12 - length
    mask = torch.ones_like(ids)
    mask[1::2, :3] = 0
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize("unit", ["layers", "forward"])
def test_generate_matches_eager_at_batch_1_and_4_with_bounded_graphs(cache_dir, unit):
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = {batch: generate(model, batch) for batch in BATCHES}
    eager_short = generate(model, 1, SHORT)
    torch._dynamo.utils.counters.clear()
    assert rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode=unit).decode == f"compiled {unit}"
    for batch in BATCHES:
        assert torch.equal(generate(model, batch), eager[batch]), batch
    assert torch.equal(generate(model, 1, SHORT), eager_short)
    assert recompile_limit_hits() == 0
    graphs = rewriter.decode_graphs("gemma4")
    if unit == "layers":  # one graph set per layer kind, KV role and batch size, whatever the layer's index
        assert {(g["layer"], g["kv"], g["batch"]) for g in graphs} == {
            (layer, kv, str(batch))
            for layer in ("sliding_attention", "full_attention")
            for kv in ("own", "stores shared", "shared")
            for batch in BATCHES
        }
    else:  # one whole-forward graph set (text model, LM head, softcap) per batch size
        assert {(g["model"], g["batch"]) for g in graphs} == {("Gemma4ForCausalLM", str(b)) for b in BATCHES}
    assert all(1 <= g["graphs"] < torch._dynamo.config.recompile_limit for g in graphs)
    assert static_sizes_only()


def static_sizes_only() -> bool:
    """Every compiled variant's tensors kept static sizes. Dynamo shares what it learnt about sizes between code
    objects of one name: variant copies named alike made the batch-4 graphs (and a full layer's, after a sliding
    one's head size) dynamic in those sizes, with slower kernels (E2B shape, layers: 1.54x eager at batch 4 against
    2.42x static)."""
    from torch._dynamo import pgo

    states = {code.name: state for code, state in pgo.get_code_state().items() if code.name.startswith(PREFIXES)}
    assert states, "no compiled variant"
    return all(
        pgo.auto_dynamic not in entry.size
        for state in states.values()
        for entry in state.automatic_dynamic.values()
        if isinstance(entry.size, tuple)
    )


def test_layers_of_one_variant_need_one_graph_under_all_of_dynamos_guards(cache_dir, monkeypatch):
    """What a layer's graph reads from its module is fixed by its variant (config, layer kind, KV role): with every
    guard dynamo makes kept, all layers of a variant still run one graph. That is what lets a decode step drop the
    guards on the module's values (``decode_guards``)."""
    from rewriter import generation

    monkeypatch.setattr(generation, "decode_guards", lambda guards: [True] * len(guards))
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers")
    generate(model, 1)
    assert [g["graphs"] for g in rewriter.decode_graphs("gemma4")] == [1] * 6


@pytest.mark.parametrize("unit", ["layers", "forward"])
def test_a_model_with_other_values_of_the_same_sizes_gets_graphs_of_its_own(cache_dir, unit):
    """A decode step does not guard the values it reads through the module (here the norms' epsilon); a second
    model whose config differs only in such a value must not run the first model's graphs."""
    first, second = testing.causal_lm(2), testing.causal_lm(2, config=testing.text_config(2, rms_norm_eps=1.0))
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = generate(second, 1)
    assert not torch.equal(eager, generate(first, 1))  # the epsilon changes the tokens
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode=unit)
    generate(first, 1)
    assert torch.equal(generate(second, 1), eager)
    assert {g["config"] for g in rewriter.decode_graphs("gemma4")} == {"#1", "#2"}


@pytest.mark.parametrize("unit", ["layers", "forward"])
def test_decode_steps_call_their_graphs_past_torch_compiles_wrapper_unless_a_stance_is_set(cache_dir, unit):
    """Once a variant has its graph, a decode step calls it through dynamo's frame hook alone (``direct_call``),
    and the graph runs (the model's Python, here its rotary embedding, does not): ``torch.compile``'s per-call
    wrapper runs only where a graph is compiled, and under a stance other than the default, which it applies (here
    ``force_eager``). Dynamo's hook is off again after each step."""
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode=unit)
    tokens = generate(model, 1)  # compiles
    compiled_steps, steps = frames_called(lambda: generate(model, 1))
    assert compiled_steps["compile_wrapper"] == 0 and steps > 0
    assert torch._C._dynamo.eval_frame.get_eval_frame_callback() is None
    with torch.compiler.set_stance("force_eager"):
        eager_steps, eager_frames = frames_called(lambda: generate(model, 1))
    assert eager_steps["compile_wrapper"] == eager_frames == steps
    rotary = "apply_rotary_pos_emb"  # every attention layer calls it: compiled, in the (eager) prefill alone
    assert eager_steps[rotary] == compiled_steps[rotary] * NEW_TOKENS > 0  # a prefill and NEW_TOKENS - 1 steps
    assert torch.equal(generate(model, 1), tokens)


def frames_called(run) -> tuple[collections.Counter, int]:
    """The Python frames ``run()`` enters, by code name, and how many of them are compiled decoding's copies."""
    names = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            names[frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return names, sum(count for name, count in names.items() if name.startswith(PREFIXES))


def negate_mlps(module, args, output):
    return -output if isinstance(module, modeling_gemma4.Gemma4TextMLP) else None


@pytest.mark.parametrize("unit", ["layers", "forward"])
def test_a_hook_registered_after_the_first_step_runs_on_its_layer_alone_until_removed(cache_dir, unit):
    """A forward hook registered on one layer's MLP after the first compiled step gets graphs of its own; the other
    layers of its variant (without KV sharing the tiny model has three sliding layers with their own K/V) keep
    theirs, and once the hook is removed no step runs it. Dynamo by default does not guard hooks and ran that
    layer without it; a decode step that dropped the guards on the hook (the dict's length, the hook's code) ran
    it on every layer of the variant, and after its removal. Dynamo guards no global module hook: while one is
    registered, decoding runs eager."""
    model = testing.causal_lm(0)
    rewriter.compile("gemma4", cache_dir=cache_dir)
    without_hook = generate(model, 1)
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: -output)
    with_hook = generate(model, 1)
    hook.remove()
    hook = torch.nn.modules.module.register_module_forward_hook(negate_mlps)
    with_global_hook = generate(model, 1)
    hook.remove()
    assert not torch.equal(with_hook, without_hook) and not torch.equal(with_global_hook, without_hook)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode=unit)
    assert torch.equal(generate(model, 1), without_hook)
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: -output)
    assert torch.equal(generate(model, 1), with_hook)
    hook.remove()
    assert torch.equal(generate(model, 1), without_hook)
    hook = torch.nn.modules.module.register_module_forward_hook(negate_mlps)
    assert torch.equal(generate(model, 1), with_global_hook)
    hook.remove()
    first, *others = [g["graphs"] for g in rewriter.decode_graphs("gemma4")]  # layer 0's variant first
    assert first == 2 and set(others) <= {1}


def test_a_variant_past_dynamos_recompile_limit_decodes_eager_with_one_warning(cache_dir, caplog):
    """Hooks that differ per layer (here one ``functools.partial`` per layer) give each layer of a variant a graph of
    its own. Past dynamo's recompile limit, where a fullgraph compile raises instead of running eager, decoding runs
    eager with one warning and the tokens stay right."""
    model = testing.causal_lm(0)  # layers 0 and 2: sliding, with their own K/V (4 stores them for later layers)
    for index in (0, 2):
        model.model.layers[index].mlp.register_forward_hook(functools.partial(scale_output, -1.0 - index))
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = generate(model, 1)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers")
    with caplog.at_level(logging.WARNING, logger="rewriter"), torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(generate(model, 1), eager)
        assert torch.equal(generate(model, 1), eager)
    failures = [record.getMessage() for record in caplog.records if "compiled decoding failed" in record.getMessage()]
    assert len(failures) == 1 and "FailOnRecompileLimitHit" in failures[0]


def scale_output(factor, module, args, output):
    return output * factor


def test_longer_sessions_share_one_graph_dynamic_in_the_cache_length(cache_dir):
    """A longer static cache compiles once more, dynamic in its length; every later length reuses that graph."""
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="forward")
    lengths = []
    for new_tokens in (6, 40, 80, 120):
        model.generate(testing.input_ids(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        lengths.append(model._cache.max_cache_len)
    assert lengths == sorted(set(lengths))  # four sessions, each on a longer cache than the last
    assert [g["graphs"] for g in rewriter.decode_graphs("gemma4")] == [2]


def test_the_multimodal_model_decodes_text_through_its_own_whole_forward_graph(cache_dir):
    """``Gemma4ForConditionalGeneration.forward`` (vision tower idle, language model, LM head) compiles whole."""
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(testing.vision_config()).eval()
    rewriter.compile("gemma4", cache_dir=cache_dir)
    eager = generate(model, 1)
    assert rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="forward").decode == "compiled forward"
    assert torch.equal(generate(model, 1), eager)
    graphs = rewriter.decode_graphs("gemma4")
    assert [(g["model"], g["batch"], g["graphs"]) for g in graphs] == [("Gemma4ForConditionalGeneration", "1", 1)]


def test_prefill_training_and_a_callers_cache_stay_eager(cache_dir):
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers")
    model.generate(testing.input_ids(), max_new_tokens=1, do_sample=False)  # prefill only
    model.generate(testing.input_ids(), max_new_tokens=3, do_sample=False, cache_implementation="dynamic")
    model.train()(testing.input_ids(), labels=testing.input_ids(), use_cache=False).loss.backward()
    assert rewriter.decode_graphs("gemma4") == []


def test_restore_and_recompiling_without_it_put_eager_decoding_back(cache_dir):
    rewriter.compile("gemma4", cache_dir=cache_dir)
    layer, causal_lm = modeling_gemma4.Gemma4TextDecoderLayer, modeling_gemma4.Gemma4ForCausalLM
    eager_layer, eager_model = layer.__dict__["forward"], causal_lm.__dict__["forward"]
    unspec_ints = torch._dynamo.config.allow_unspec_int_on_nn_module
    skip_hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
    own_masks = modeling_gemma4.Gemma4ForConditionalGeneration.__dict__["create_masks_for_generate"]

    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers")
    assert layer.__dict__["forward"] is not eager_layer and "generate" in modeling_gemma4.Gemma4ForCausalLM.__dict__
    report = rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="forward")
    assert report.decode == "compiled forward"
    assert layer.__dict__["forward"] is eager_layer and causal_lm.__dict__["forward"] is not eager_model
    assert rewriter.compile("gemma4", cache_dir=cache_dir).decode == "eager"
    assert causal_lm.__dict__["forward"] is eager_model
    assert "generate" not in modeling_gemma4.Gemma4ForCausalLM.__dict__
    assert "create_masks_for_generate" not in modeling_gemma4.Gemma4ForCausalLM.__dict__
    rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers")
    rewriter.restore("gemma4")
    assert layer.__dict__["forward"] is eager_layer
    assert "generate" not in modeling_gemma4.Gemma4ForConditionalGeneration.__dict__
    assert modeling_gemma4.Gemma4ForConditionalGeneration.__dict__["create_masks_for_generate"] is own_masks
    assert torch._dynamo.config.allow_unspec_int_on_nn_module == unspec_ints
    assert torch._dynamo.config.skip_nnmodule_hook_guards == skip_hook_guards


def test_unknown_unit_and_attention_together_are_refused(cache_dir):
    with pytest.raises(ValueError, match="forward, layers"):
        rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="model")
    with pytest.raises(ValueError, match="compile_attention"):
        rewriter.compile("gemma4", cache_dir=cache_dir, compile_decode="layers", compile_attention=True)


def test_without_a_compiler_decoding_stays_eager_with_one_warning(cache_dir):
    code = f"""
import torch
import rewriter
from rewriter import testing
report = rewriter.compile("gemma4", cache_dir={str(cache_dir)!r}, compile_decode="layers")
print(report.decode)
testing.causal_lm(2).generate(testing.input_ids(), max_new_tokens=3, do_sample=False)
"""
    result = run_python(code, env={"CXX": "/nonexistent/g++"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("eager (") and "C++ compiler" in result.stdout
    assert "/nonexistent/g++" in result.stdout
    assert result.stderr.count("decoding stays eager") == 1


def test_command_line_flag_reports_the_unit(cache_dir):
    flags = ("--compile-decode", "layers", "--json", "--cache-dir", str(cache_dir))
    result = run_python("", "-m", "rewriter", "compile", "gemma4", *flags)
    assert result.returncode == 0, result.stderr
    assert '"decode": "compiled layers"' in result.stdout


def test_with_dynamo_switched_off_decoding_runs_the_copy_eager(cache_dir):
    """``TORCHDYNAMO_DISABLE=1`` makes ``torch.compile`` hand back the function it was given: decoding runs it."""
    code = f"""
import torch
import rewriter
from rewriter import testing
model = testing.causal_lm(2)
rewriter.compile("gemma4", cache_dir={str(cache_dir)!r})
eager = model.generate(testing.input_ids(), max_new_tokens=3, do_sample=False)
for unit in ("layers", "forward"):
    rewriter.compile("gemma4", cache_dir={str(cache_dir)!r}, compile_decode=unit)
    print(torch.equal(model.generate(testing.input_ids(), max_new_tokens=3, do_sample=False), eager))
"""
    result = run_python(code, env={"TORCHDYNAMO_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
