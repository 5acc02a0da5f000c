"""The command line, run as a user runs it: ``python -m rewriter ...`` in a fresh process."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from rewriter.cache import apply_diff, manifest_digest, sha256, shipped_cache
from rewriter.families import get_family, installed_transformers
from tests.conftest import release_tree, run_python


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
        ("sdpa-gqa-head-dim", "applied", 2),
        ("kv-sharing-without-cache", "applied", 3),
        ("kv-sharing-fsdp2", "applied", 1),
        ("input-proj-dequant", "applied", 2),
        ("rotary-buffer-order", "applied", 1),
        ("rotary-compute-order", "applied", 1),
        ("text-only-training", "applied", 1),
        ("loss-accumulation", "applied", 2),
        ("fp16-vision-pooler", "applied", 2),
        ("per-layer-inputs-from-embeds", "applied", 1),
        ("text-only-output-properties", "not_needed", 0),  # a property from 5.24.0
        ("audio-sdpa-fallback", "not_needed", 0),  # the audio tower refuses sdpa from 5.20.0
        ("audio-eager-mask", "applied", 1),
        ("audio-features-dtype", "applied", 1),
        ("audio-quantized-weights", "applied", 3),
        ("router-softmax-float32", "applied", 1),
        ("image-bidirectional-mask", "applied", 1),
        ("per-layer-inputs-none", "not_needed", 0),  # 5.23.0 and 5.24.0 only
        ("video-features-tuple", "not_needed", 0),  # 5.15.0 only
    ]
    assert report["origin"] == "shipped"


def test_compile_without_the_shipped_cache_writes_the_user_cache(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", "--json", cache_dir=cache_dir, env={"REWRITER_NO_SHIPPED": "1"})
    assert code == 0, err
    report = json.loads(out)
    assert report["origin"] == "compiled" and report["cache_path"].startswith(str(cache_dir))


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
    assert "+        shared_kv_states = KVSharingDict()" in out
    assert "+        self.input_proj = Gemma4DequantizingLinear(" in out


def test_unknown_family_is_a_clear_error(cache_dir):
    code, out, _ = rewriter_cli("compile", "nope", cache_dir=cache_dir)
    assert code == 2
    assert "unknown model family 'nope'; known families: gemma2, gemma3, gemma3n, gemma4" in out


def test_demo_shows_every_bug_then_fixes_it(cache_dir):
    code, out, err = rewriter_cli("demo", cache_dir=cache_dir)
    assert code == 0, out + err
    assert "IndexError" in out and "mat1 and mat2 shapes cannot be multiplied" in out
    assert "hash seed 0: full, sliding; hash seed 1: sliding, full" in " ".join(out.split())
    assert out.count("│ fixed │") == 10 and "NOT FIXED" not in out


def test_compile_attention_flag_reports_the_attention(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma4", "--compile-attention", "--json", cache_dir=cache_dir)
    assert code == 0, err
    assert json.loads(out)["attention"] == "compiled"


def test_fused_loss_flag_builds_its_entry_into_the_user_cache(cache_dir):
    code, out, err = rewriter_cli("compile", "gemma3", "--fused-loss", "--json", cache_dir=cache_dir)
    assert code == 0, err
    report = json.loads(out)
    assert report["origin"] == "compiled" and report["cache_path"].startswith(str(cache_dir))
    assert [outcome for outcome in report["outcomes"] if outcome["rule"] == "fused-loss"] == [
        {"rule": "fused-loss", "status": "applied", "sites": 2, "file": "models/gemma3/modeling_gemma3.py", "detail": ""}
    ]
    code, out, _ = rewriter_cli("compile", "gemma3", "--fused-loss", "--json", cache_dir=cache_dir)
    assert code == 0 and json.loads(out)["origin"] == "user_cache"
    code, out, _ = rewriter_cli("cache", "info", "--json", cache_dir=cache_dir)
    entries = {entry["family"]: entry for entry in json.loads(out)}
    assert entries["gemma3+fused-loss"]["user_cache"] and not entries["gemma3+fused-loss"]["shipped"]
    assert entries["gemma3"]["shipped"] and not entries["gemma4+fused-loss"]["user_cache"]
    code, out, _ = rewriter_cli("compile", "trainer", "--fused-loss", "--json", cache_dir=cache_dir)
    assert code == 2 and json.loads(out) == {
        "error": "trainer has no feature fused-loss (its features: none)", "kind": "usage", "exit_code": 2
    }


def test_cache_info_verify_and_clear(cache_dir):
    env = {"REWRITER_NO_SHIPPED": "1"}
    assert rewriter_cli("compile", "gemma4", cache_dir=cache_dir, env=env)[0] == 0
    code, out, err = rewriter_cli("cache", "info", cache_dir=cache_dir)
    assert code == 0, err
    assert "installed transformers: 5.5.0" in out and str(cache_dir) in out
    (entry,) = cache_dir.glob("*.json")
    code, out, _ = rewriter_cli("cache", "verify", cache_dir=cache_dir)
    entries = len(shipped_cache().keys()) + 1  # the shipped ones and this one
    assert code == 0 and f"{entries} of {entries} entries check" in out
    diff = cache_dir / f"{json.loads(entry.read_text())['diffs']['cache_utils.py']}.diff"
    diff.write_text("# planted\n")
    code, out, _ = rewriter_cli("cache", "verify", cache_dir=cache_dir)
    assert code == 1 and f"bad user_cache entry {entry}: the diff of cache_utils.py does not match its sha256" in out
    code, out, _ = rewriter_cli("cache", "clear", cache_dir=cache_dir)
    assert code == 0 and f"removed 1 entries from {cache_dir}" in out
    assert [path.name for path in cache_dir.iterdir()] == []


def source_tree_that_does_not_parse(folder: Path) -> Path:
    """A copy of the installed transformers' target files in which ``cache_utils.py`` does not parse."""
    from rewriter.families import get_family, installed_transformers

    family = get_family("gemma4")
    package = installed_transformers(family)[1]
    for target in family.targets:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / target, folder / target)
    with open(folder / "cache_utils.py", "a") as file:
        file.write("def broken(:\n")
    return folder


@pytest.mark.parametrize("command", ["report", "diff"])
def test_source_that_does_not_parse_is_a_one_line_error(tmp_path, cache_dir, command):
    source = source_tree_that_does_not_parse(tmp_path / "src")
    code, out, err = rewriter_cli(command, "gemma4", "--source-dir", str(source), cache_dir=cache_dir)
    assert code == 3
    broken = re.escape(str(source / "cache_utils.py"))
    assert re.fullmatch(rf"error: {broken} does not parse: line \d+: invalid syntax\n", out)
    assert "Traceback" not in out + err


def test_json_errors_are_json(tmp_path, cache_dir):
    source = source_tree_that_does_not_parse(tmp_path / "src")
    code, out, _ = rewriter_cli("report", "gemma4", "--source-dir", str(source), "--json", cache_dir=cache_dir)
    assert code == 3
    error = json.loads(out)
    assert error["kind"] == "syntax" and error["exit_code"] == 3
    assert error["error"].startswith(f"{source / 'cache_utils.py'} does not parse: line ")
    code, out, _ = rewriter_cli("compile", "nope", "--json", cache_dir=cache_dir)
    assert code == 2 and json.loads(out)["kind"] == "usage"


@pytest.mark.parametrize("command", [("report", "gemma4"), ("scan",), ("cache", "info")], ids=lambda c: c[0])
def test_empty_source_dir_is_refused(command, cache_dir):
    code, out, err = rewriter_cli(*command, "--source-dir", "", cache_dir=cache_dir)
    assert code == 2
    assert out.strip() == "error: --source-dir is empty: name a transformers package folder, or leave it out"


def test_prebuild_of_a_release_that_does_not_exist_is_a_one_line_error(tmp_path, cache_dir):
    env = {"REWRITER_WHEEL_DIR": str(tmp_path / "wheels")}
    code, out, err = rewriter_cli("prebuild", "5.99.0", "--out", str(tmp_path / "out"), cache_dir=cache_dir, env=env)
    assert code == 5
    assert out.strip() == (
        "error: cannot download the transformers 5.99.0 wheel: "
        "ERROR: No matching distribution found for transformers==5.99.0"
    )
    assert "Traceback" not in out + err
    code, out, err = rewriter_cli("prebuild", "9.9.9", "--out", str(tmp_path / "out"), cache_dir=cache_dir, env=env)
    assert code == 2 and out.startswith("error: no family supports transformers 9.9.9 (gemma2 >=4.53,<6, ")


def test_verify_deep_finds_a_file_edited_with_its_hashes(cache_dir):
    """Who can write the cache folder can run code: an edit that updates every hash is a hit, which only a
    rebuild (``--deep``) tells apart."""
    env = {"REWRITER_NO_SHIPPED": "1"}
    assert rewriter_cli("compile", "gemma4", cache_dir=cache_dir, env=env)[0] == 0
    (entry,) = cache_dir.glob("*.json")
    manifest = json.loads(entry.read_text())
    diff = (cache_dir / f"{manifest['diffs']['cache_utils.py']}.diff").read_text()
    diff = re.sub(r"^(\+.*config\.num_kv_shared_layers\])$", r"\1  # edited", diff, flags=re.MULTILINE)
    (cache_dir / f"{sha256(diff)}.diff").write_text(diff)
    source = (installed_transformers(get_family("gemma4"))[1] / "cache_utils.py").read_text()
    manifest["diffs"]["cache_utils.py"] = sha256(diff)
    manifest["files"]["cache_utils.py"] = sha256(apply_diff(source, diff))
    manifest["digest"] = manifest_digest(manifest)
    entry.write_text(json.dumps(manifest))
    code, out, err = rewriter_cli("compile", "gemma4", "--json", cache_dir=cache_dir, env=env)
    assert code == 0 and json.loads(out)["origin"] == "user_cache", err
    assert rewriter_cli("cache", "verify", cache_dir=cache_dir)[0] == 0
    code, out, _ = rewriter_cli("cache", "verify", "--deep", cache_dir=cache_dir)
    assert code == 1
    assert f"bad user_cache entry {entry}: cache_utils.py differs from what the rules write for its sources" in out
    # the shipped entries of 5.5.0 (gemma2, gemma3, gemma3n, gemma4, trainer) and this one
    assert "6 rebuilt from the installed transformers" in out


@pytest.mark.parametrize("version, shipped", [("5.13.1", True), ("5.10.0", False)])
def test_cache_info_names_each_family_entry_of_a_source_tree(version, shipped, cache_dir, tmp_path):
    """gemma4 ships an entry for 5.13.1, not for the yanked 5.10.0; the tree holds only gemma4's files, so only
    gemma4 is named, with its opt-in fused loss (never shipped)."""
    source_dir = str(release_tree(version, "gemma4", tmp_path))
    code, out, err = rewriter_cli("cache", "info", "--source-dir", source_dir, "--json", cache_dir=cache_dir)
    assert code == 0, err
    entry, fused = json.loads(out)
    assert (entry["family"], entry["shipped"], entry["user_cache"], len(entry["key"])) == ("gemma4", shipped, False, 64)
    assert (fused["family"], fused["shipped"], fused["user_cache"]) == ("gemma4+fused-loss", False, False)


def test_diff_prints_the_shipped_entry_of_a_release_as_stored(tmp_path, cache_dir):
    """What exactly does rewriter change in 5.13.1? The diffs its shipped entry holds, read without LibCST."""
    from rewriter.build import entry_key
    from rewriter.families import FAMILIES, read_sources

    package = release_tree("5.13.1", "gemma4", tmp_path)
    sources = read_sources(FAMILIES["gemma4"], package)
    manifest = json.loads(shipped_cache().manifest(entry_key(FAMILIES["gemma4"], sources)[0]).read_text())
    stored = "".join((shipped_cache().root / f"{name}.diff").read_text() for name in manifest["diffs"].values())
    code = "import sys\nfrom rewriter.cli import main\nexit_code = main(sys.argv[1:])\n"
    code += "assert 'libcst' not in sys.modules, 'libcst was imported'\nsys.exit(exit_code)"
    result = run_python(code, "diff", "gemma4", "--source-dir", str(package))
    assert result.returncode == 0, result.stderr
    assert result.stdout == stored and "+class Gemma4DequantizingLinear(nn.Linear):" in stored
