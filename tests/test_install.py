"""Installing patched code keeps every object the user holds, is idempotent, reversible, and debuggable."""

from __future__ import annotations

import inspect
import linecache
import logging
import traceback
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.gemma4 import modeling_gemma4

import rewriter
from rewriter import testing
from rewriter.install import InstallError, install, plan, uninstall
from tests.conftest import run_python

Attention = modeling_gemma4.Gemma4TextAttention
MODELING = "models/gemma4/modeling_gemma4.py"


def patched_functions():
    return {
        "attention": Attention.forward,
        "model": inspect.unwrap(modeling_gemma4.Gemma4TextModel.forward),
        "cache": transformers.DynamicCache.__init__,
    }


def test_classes_and_functions_keep_their_identity(cache_dir):
    classes = (transformers.DynamicCache, transformers.Gemma4ForCausalLM, Attention)
    functions = patched_functions()
    model = testing.causal_lm(2)
    rewriter.compile("gemma4", cache_dir=cache_dir)
    assert (transformers.DynamicCache, transformers.Gemma4ForCausalLM, modeling_gemma4.Gemma4TextAttention) == classes
    assert patched_functions() == functions
    assert isinstance(model, transformers.Gemma4ForCausalLM)
    assert isinstance(transformers.DynamicCache(config=testing.text_config(0)), transformers.DynamicCache)
    assert "shared_kv_states" in inspect.signature(model.model.layers[0].self_attn.forward).parameters


def test_source_and_tracebacks_show_the_patched_lines(patched):
    source_file = inspect.getsourcefile(Attention.forward)
    assert source_file == f"<rewriter {patched.key[:12]} transformers/{MODELING}>"
    assert "shared_kv_states[self.kv_shared_layer_index]" in inspect.getsource(Attention.forward)
    model = testing.causal_lm(2)
    shared = model.model.layers[5].self_attn
    hidden = torch.zeros(1, 3, 64)
    with pytest.raises(TypeError) as error:
        shared(hidden, position_embeddings=(torch.ones(1, 3, 32), torch.zeros(1, 3, 32)), attention_mask=None)
    frame = traceback.extract_tb(error.value.__traceback__)[-1]
    assert frame.filename == source_file
    assert frame.line == "key_states, value_states = shared_kv_states[self.kv_shared_layer_index]"
    assert rewriter.patched_source("gemma4", MODELING).splitlines()[frame.lineno - 1].strip() == frame.line


def test_a_cleared_linecache_shows_no_source_rather_than_upstream_lines(patched):
    """The patched text lives in ``linecache``; once cleared, the angle-bracketed name keeps ``linecache`` from
    reading the upstream file (whose lines would not match) in its place."""
    linecache.clearcache()
    with pytest.raises(OSError):
        inspect.getsource(Attention.forward)


def test_classes_a_rule_adds_or_changes_show_their_patched_source(patched):
    """``inspect`` finds a class through its module's file: while patched, that is the patched copy of the module."""
    added = modeling_gemma4.Gemma4DequantizingLinear
    assert Path(inspect.getsourcefile(added)).read_text() == rewriter.patched_source("gemma4", MODELING)
    assert inspect.getsource(added).startswith("class Gemma4DequantizingLinear(nn.Linear):")
    assert "self.input_proj = Gemma4DequantizingLinear(" in inspect.getsource(modeling_gemma4.Gemma4VisionPatchEmbedder)
    assert "shared_kv_states[self.kv_shared_layer_index]" in inspect.getsource(Attention)
    rewriter.restore("gemma4")
    assert inspect.getsourcefile(Attention) == str(Path(transformers.__file__).parent / MODELING)


def test_compiling_twice_changes_nothing(cache_dir):
    first = rewriter.compile("gemma4", cache_dir=cache_dir)
    codes = {name: function.__code__ for name, function in patched_functions().items()}
    assert rewriter.compile("gemma4", cache_dir=cache_dir) is first
    assert {name: function.__code__ for name, function in patched_functions().items()} == codes


def test_restore_puts_the_original_code_back(cache_dir):
    originals = {name: function.__code__ for name, function in patched_functions().items()}
    rewriter.compile("gemma4", cache_dir=cache_dir)
    assert hasattr(modeling_gemma4, "Gemma4DequantizingLinear")
    assert rewriter.restore("gemma4") is True
    assert {name: function.__code__ for name, function in patched_functions().items()} == originals
    assert not hasattr(modeling_gemma4, "Gemma4DequantizingLinear")
    assert transformers.DynamicCache(config=testing.text_config(0)).layers == []
    assert rewriter.restore("gemma4") is False


def test_second_process_uses_the_cache_entry(cache_dir):
    first = rewriter.compile("gemma4", cache_dir=cache_dir, use_shipped=False)
    assert first.origin == "compiled"
    code = f"import rewriter; print(rewriter.compile('gemma4', cache_dir={str(cache_dir)!r}, use_shipped=False).origin)"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["user_cache"]


def test_compile_before_importing_transformers(cache_dir):
    code = f"""
import sys, inspect, rewriter
assert "transformers.models.gemma4.modeling_gemma4" not in sys.modules
rewriter.compile("gemma4", cache_dir={str(cache_dir)!r})
from transformers import Gemma4ForCausalLM, StaticCache
from rewriter import testing
assert len(StaticCache(config=testing.text_config(0), max_cache_len=8).layers) == 6
print(inspect.getsourcefile(Gemma4ForCausalLM.__mro__[0].forward))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_unwritable_cache_compiles_in_memory_and_warns_once(tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = rewriter.compile("gemma4", cache_dir=not_a_folder, use_shipped=False)
        rewriter.restore("gemma4")
        rewriter.compile("gemma4", cache_dir=not_a_folder, use_shipped=False)
    assert report.origin == "memory" and report.cache_path is None
    assert len(caplog.records) == 1 and f"{not_a_folder} is not a folder" in caplog.records[0].message
    assert "shared_kv_states" in inspect.getsource(Attention.forward)
    assert transformers.DynamicCache(config=testing.text_config(0)).layers != []


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'nope'; known families: gemma2, gemma3, gemma3n, gemma4"):
        rewriter.compile("nope")


def test_compile_on_import_patches_only_the_families_a_program_imports(cache_dir):
    code = f"""
import sys
import transformers
import rewriter

modules = {{name: f"transformers.models.{{name}}.modeling_{{name}}" for name in ("gemma3", "gemma3n", "gemma4")}}
assert rewriter.compile_on_import(cache_dir={str(cache_dir)!r}) == {{}}
assert not any(module in sys.modules for module in modules.values())
from transformers import Gemma3ForCausalLM
print(rewriter.compiled("gemma3").outcome("rotary-buffer-order").status)
print(*[module in sys.modules for module in modules.values()])
print(rewriter.compiled("gemma4"), rewriter.compile_on_import("gemma3")["gemma3"].family)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == ["applied", "True False False", "None gemma3"]


def test_a_required_family_is_patched_only_when_the_program_imports_its_module(cache_dir):
    """gemma4 requires ``trainer`` (Trainer 5.2.0-5.5.3); compiling never imports it (2 s), importing it patches it."""
    code = f"""
import sys
import rewriter

rewriter.compile("gemma4", cache_dir={str(cache_dir)!r})
print("transformers.trainer" in sys.modules, rewriter.compiled("trainer"))
from transformers import Trainer
print(rewriter.compiled("trainer").outcome("accumulation-double-division").status)
print(Trainer.create_accelerator_and_postprocess.__code__.co_filename.startswith("<rewriter "))
rewriter.restore("trainer")
print(Trainer.create_accelerator_and_postprocess.__code__.co_filename.startswith("<rewriter "))
"""
    result = run_python(code, env={"REWRITER_NO_SHIPPED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "None", "applied", "True", "False"]


SCRATCH = '''
FLAG = "module-level"


class Model:
    FLAG = True
    _supports_sdpa = True

    def forward(self):
        return "forward"
'''


def test_a_changed_literal_class_attribute_is_set_on_the_live_class_and_restored(tmp_path, monkeypatch):
    (tmp_path / "rewriter_scratch_model.py").write_text(SCRATCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    import rewriter_scratch_model as module

    patched = SCRATCH.replace("_supports_sdpa = True", "_supports_sdpa = False  # now refused")
    patch = plan("rewriter_scratch_model", SCRATCH, patched)
    assert (patch.replacements, patch.definitions) == ((), ())
    assert patch.attributes == (("Model._supports_sdpa", 7, 7),)
    installed = install(patch, patched, "<scratch>")
    assert module.Model._supports_sdpa is False and module.Model().forward() == "forward"
    uninstall(installed)
    assert module.Model._supports_sdpa is True


@pytest.mark.parametrize(
    "old, new, why",
    [
        ("_supports_sdpa = True", "_supports_sdpa = FLAG", "must be a literal"),  # a class body's name: not resolved
        ("_supports_sdpa = True", "_supports_sdpa = True\n    _supports_flex = False", "not only its methods"),
        ("    _supports_sdpa = True\n", "", "not only its methods"),
        ("_supports_sdpa = True", "_supports_flash = True", "not only its methods"),
    ],
    ids=["computed", "added", "removed", "renamed"],
)
def test_a_class_attribute_rule_change_other_than_a_new_literal_is_refused(old, new, why):
    with pytest.raises(InstallError, match=why):
        plan("rewriter_scratch_model", SCRATCH, SCRATCH.replace(old, new))
