"""The command line, run as a user runs it: ``python -m rewriter ...`` in a fresh process."""

from __future__ import annotations

import json

from rewriter.api import shipped_cache
from tests.conftest import run_python


def rewriter_cli(*args: str, cache_dir, env: dict | None = None) -> tuple[int, str, str]:
    env = {"REWRITER_CACHE_DIR": str(cache_dir), "COLUMNS": "400", **(env or {})}
    result = run_python("", "-m", "rewriter", *args, env=env)
    return result.returncode, result.stdout, result.stderr


def test_compile_json(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", "--json", cache_dir=cache_dir)
    assert code == 0, err
    report = json.loads(out)
    assert [(o["rule"], o["status"], o["sites"]) for o in report["outcomes"]] == [
        ("kv-shared-slice", "applied", 2),
        ("kv-sharing-without-cache", "applied", 2),
        ("input-proj-dequant", "applied", 2),
        ("rotary-buffer-order", "applied", 1),
    ]
    assert report["source"] == "shipped"


def test_compile_without_the_shipped_cache_writes_the_user_cache(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", "--json", cache_dir=cache_dir, env={"REWRITER_NO_SHIPPED": "1"})
    assert code == 0, err
    report = json.loads(out)
    assert report["source"] == "compiled" and report["cache_path"].startswith(str(cache_dir))


def test_compile_table(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", cache_dir=cache_dir)
    assert code == 0, err
    for rule in ("kv-shared-slice", "kv-sharing-without-cache", "input-proj-dequant"):
        assert rule in out


def test_diff_shows_each_rule_change(cache_dir):
    code, out, err = rewriter_cli("diff", "gemma4", cache_dir=cache_dir)
    assert code == 0, err
    assert "+++ b/transformers/cache_utils.py" in out
    assert "+                layer_types = layer_types[: len(layer_types) - decoder_config.num_kv_shared_layers]" in out
    assert "+        shared_kv_states = {}" in out
    assert "+        self.input_proj = Gemma4DequantizingLinear(" in out


def test_unknown_family_is_a_clear_error(cache_dir):
    code, out, _ = rewriter_cli("compile", "nope", cache_dir=cache_dir)
    assert code == 2
    assert "unknown model family 'nope'; known families: gemma3, gemma3n, gemma4" in out


def test_demo_shows_every_bug_then_fixes_it(cache_dir):
    code, out, err = rewriter_cli("demo", cache_dir=cache_dir)
    assert code == 0, out + err
    assert "IndexError" in out and "mat1 and mat2 shapes cannot be multiplied" in out
    assert "hash seed 0: full, sliding; hash seed 1: sliding, full" in " ".join(out.split())
    assert out.count("│ fixed │") == 5 and "NOT FIXED" not in out


def test_compile_attention_flag_reports_the_attention(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", "--compile-attention", "--json", cache_dir=cache_dir)
    assert code == 0, err
    assert json.loads(out)["attention"] == "compiled"


def test_cache_info_verify_and_clear(cache_dir):
    env = {"REWRITER_NO_SHIPPED": "1"}
    assert rewriter_cli("compile", "gemma4", cache_dir=cache_dir, env=env)[0] == 0
    code, out, err = rewriter_cli("cache", "info", cache_dir=cache_dir)
    assert code == 0, err
    assert "installed transformers: 5.5.0" in out and str(cache_dir) in out
    (entry,) = [path for path in cache_dir.iterdir() if len(path.name) == 64]
    code, out, _ = rewriter_cli("cache", "verify", cache_dir=cache_dir)
    entries = len(shipped_cache().keys()) + 1  # the shipped ones and this one
    assert code == 0 and f"{entries} of {entries} entries check" in out
    (entry / "transformers" / "cache_utils.py").write_text("# planted\n")
    code, out, _ = rewriter_cli("cache", "verify", cache_dir=cache_dir)
    assert code == 1 and f"bad user entry {entry}: cache_utils.py does not match its sha256" in out
    code, out, _ = rewriter_cli("cache", "clear", cache_dir=cache_dir)
    assert code == 0 and f"removed 1 entries from {cache_dir}" in out
    assert not entry.exists()
