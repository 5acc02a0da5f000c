"""The cache with real processes and real files: concurrency, corruption, permissions, keys, the shipped entries."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from transformers.models.gemma4 import modeling_gemma4

import rewriter
from rewriter import testing
from rewriter.cache import CacheDir, apply_diff, manifest_digest, sha256, shipped_cache
from rewriter.families import FAMILIES, installed_transformers, read_sources
from rewriter.prebuild import prebuild
from tests.conftest import ROOT, build_wheel, mutated_transformers, run_python

MODELING = "models/gemma4/modeling_gemma4.py"

PATCH_IN_A_FRESH_PROCESS = """
import sys, rewriter
from rewriter import testing
report = rewriter.compile("gemma4", cache_dir=sys.argv[1], use_shipped=False)
from transformers import StaticCache
assert len(StaticCache(config=testing.text_config(0), max_cache_len=8).layers) == 6, "not patched"
print(report.origin)
"""


def compile_fresh(cache_dir, **kwargs) -> rewriter.CompileReport:
    rewriter.restore("gemma4")
    return rewriter.compile("gemma4", cache_dir=cache_dir, use_shipped=False, **kwargs)


def entry_files(manifest: Path) -> dict[str, bytes]:
    """An entry's manifest, without its ``built`` record (which describes the build machine), and its diffs."""
    data = json.loads(manifest.read_text())
    del data["built"]
    files = {manifest.name: json.dumps(data, sort_keys=True).encode()}
    for name in data["diffs"].values():
        files[f"{name}.diff"] = (manifest.parent / f"{name}.diff").read_bytes()
    return files


def diff_of(manifest: Path, target: str) -> Path:
    return manifest.parent / f"{json.loads(manifest.read_text())['diffs'][target]}.diff"


def installed_sources() -> dict[str, str]:
    return read_sources(FAMILIES["gemma4"], installed_transformers(FAMILIES["gemma4"])[1])


def test_eight_processes_on_an_empty_cache_build_one_entry(tmp_path):
    cache = tmp_path / "cache"
    processes = [
        subprocess.Popen([sys.executable, "-c", PATCH_IN_A_FRESH_PROCESS, str(cache)], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    origins = [process.communicate(timeout=600)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0] * 8
    assert sorted(set(origins)) <= ["compiled", "user_cache"] and "compiled" in origins
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1
    assert sorted(path.name for path in cache.iterdir()) == sorted([".locks", *entry_files(entries[0])])
    single = compile_fresh(tmp_path / "single")
    assert entry_files(entries[0]) == entry_files(Path(single.cache_path))


def corrupt_truncate(entry: Path) -> None:
    path = diff_of(entry, MODELING)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def corrupt_flip_a_byte(entry: Path) -> None:
    path = diff_of(entry, MODELING)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_plant_code(entry: Path) -> None:
    """Code that leaves a marker file if it ever runs, on the same line so that line numbers still fit."""
    path = diff_of(entry, MODELING)
    marker = entry.parent.parent / "executed"
    text = path.read_text().replace("shared_kv_states = KVSharingDict()", f"shared_kv_states = KVSharingDict(); open({str(marker)!r}, 'w')")
    path.write_text(text)


def corrupt_manifest_for_other_sources(entry: Path) -> None:
    manifest = json.loads(entry.read_text())
    manifest["components"]["sources"][MODELING] = "0" * 64
    entry.write_text(json.dumps(manifest))


def corrupt_manifest_hash(entry: Path) -> None:
    manifest = json.loads(entry.read_text())
    manifest["files"]["cache_utils.py"] = "f" * 64
    entry.write_text(json.dumps(manifest))


def corrupt_delete_a_diff(entry: Path) -> None:
    diff_of(entry, "cache_utils.py").unlink()


def modeling_plan(manifest: dict) -> dict:
    return manifest["patches"][MODELING]


def shift_plan_by_a_line(manifest: dict, entry: Path) -> None:
    plan = modeling_plan(manifest)
    plan["replacements"] = [[name, *(line + 1 for line in lines)] for name, *lines in plan["replacements"]]


def point_plan_at_another_function(manifest: dict, entry: Path) -> None:
    """The patch embedder's ``__init__`` replacement names the lines of the added class's ``__init__`` instead."""
    plan = modeling_plan(manifest)
    first, last = plan["definitions"][0]
    lines = apply_diff(installed_sources()[MODELING], diff_of(entry, MODELING).read_text()).splitlines(keepends=True)
    added = ast.parse("".join(lines[first - 1 : last])).body[0]
    init = next(node for node in added.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    start, end = first - 1 + init.lineno, first - 1 + init.end_lineno
    plan["replacements"] = [[plan["replacements"][0][0], start, start, end]]


def plan_sets_a_method_as_a_class_attribute(manifest: dict, entry: Path) -> None:
    """A class attribute row that names the lines of a patched method: evaluated, they would replace the method."""
    plan = modeling_plan(manifest)
    qualname, _, start, last = plan["replacements"][0]
    plan["attributes"] = [[qualname, start, last]]


def empty_plan(manifest: dict, entry: Path) -> None:
    modeling_plan(manifest).update(definitions=[], replacements=[])


def plan_as_a_string(manifest: dict, entry: Path) -> None:
    modeling_plan(manifest)["definitions"] = "579-607"


def no_files(manifest: dict, entry: Path) -> None:
    manifest["files"] = {}


def swap_the_diffs(manifest: dict, entry: Path) -> None:
    diffs = manifest["diffs"]
    diffs[MODELING], diffs["cache_utils.py"] = diffs["cache_utils.py"], diffs[MODELING]


def patches_as_a_list(manifest: dict, entry: Path) -> None:
    manifest["patches"] = []


def outcome_not_needed_at_99_sites(manifest: dict, entry: Path) -> None:
    manifest["outcomes"][0].update(status="not_needed", sites=99)


def manifest_edit(edit, *, redigest: bool):
    """A corruption that applies ``edit`` to the manifest; with ``redigest`` it also updates the manifest's digest,
    so that only the checks of its shape and of the install plans against the files can catch it."""

    def corrupt(entry: Path) -> None:
        manifest = json.loads(entry.read_text())
        edit(manifest, entry)
        if redigest:
            manifest["digest"] = manifest_digest(manifest)
        entry.write_text(json.dumps(manifest))

    corrupt.__name__ = edit.__name__ + ("_redigested" if redigest else "")
    return corrupt


MANIFEST_EDITS = [
    shift_plan_by_a_line,
    point_plan_at_another_function,
    plan_sets_a_method_as_a_class_attribute,
    empty_plan,
    plan_as_a_string,
    no_files,
    swap_the_diffs,
    patches_as_a_list,
    outcome_not_needed_at_99_sites,
]
# edits that only the digest can tell: the result is well formed and its plans fit the files
DIGEST_ONLY = {point_plan_at_another_function}


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncate,
        corrupt_flip_a_byte,
        corrupt_plant_code,
        corrupt_manifest_for_other_sources,
        corrupt_manifest_hash,
        corrupt_delete_a_diff,
        *(manifest_edit(edit, redigest=False) for edit in MANIFEST_EDITS),
        *(manifest_edit(edit, redigest=True) for edit in MANIFEST_EDITS if edit not in DIGEST_ONLY),
    ],
    ids=lambda corrupt: corrupt.__name__,
)
def test_a_damaged_entry_is_detected_never_executed_and_replaced(tmp_path, caplog, corrupt):
    cache = tmp_path / "cache"
    good = compile_fresh(cache)
    entry = Path(good.cache_path)
    expected = entry_files(entry)
    corrupt(entry)
    assert CacheDir(cache).verify(good.key, installed_sources()) is not None  # what `cache verify` reports
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = compile_fresh(cache)
    assert report.origin == "compiled"
    assert report.outcomes == good.outcomes
    assert f"not using cache entry {entry}" in caplog.text
    assert entry_files(entry) == expected
    testing.causal_lm(2)(testing.input_ids(), use_cache=False)
    assert "Gemma4DequantizingLinear(" in inspect.getsource(modeling_gemma4.Gemma4VisionPatchEmbedder.__init__)
    assert not (tmp_path / "executed").exists()


def test_group_or_world_writable_cache_folder_is_refused(tmp_path, caplog):
    cache = tmp_path / "cache"
    compile_fresh(cache)
    cache.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = compile_fresh(cache)
    assert report.origin == "memory"
    assert "writable by its group or by everyone" in caplog.text
    assert len(transformers.StaticCache(config=testing.text_config(0), max_cache_len=8).layers) == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_cache_folder_owned_by_another_user_is_refused(tmp_path, caplog):
    cache = tmp_path / "cache"
    compile_fresh(cache)
    os.chown(cache, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = compile_fresh(cache)
    assert report.origin == "memory"
    assert "owned by another user (uid 65534)" in caplog.text
    assert len(transformers.StaticCache(config=testing.text_config(0), max_cache_len=8).layers) == 6


def test_symlinked_manifest_is_refused_and_replaced(tmp_path, caplog):
    cache = tmp_path / "cache"
    entry = Path(compile_fresh(cache).cache_path)
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(entry, elsewhere)
    entry.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = compile_fresh(cache)
    assert f"{entry} is a symlink" in caplog.text
    assert report.origin == "compiled"
    assert entry.is_file() and not entry.is_symlink()


def test_symlinked_diff_is_never_written_through(tmp_path, caplog):
    cache = tmp_path / "cache"
    entry = Path(compile_fresh(cache).cache_path)
    diff = diff_of(entry, MODELING)
    outside = tmp_path / "outside.diff"
    outside.write_text("# theirs\n")
    diff.unlink()
    diff.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        report = compile_fresh(cache)
    assert f"{diff} is a symlink" in caplog.text
    assert report.origin == "compiled"
    assert outside.read_text() == "# theirs\n"
    assert not diff.is_symlink() and CacheDir(cache).verify(report.key, installed_sources()) is None


COMPILE_TWICE = """
import sys, rewriter
origins = []
for _ in range(2):
    rewriter.restore("gemma4")
    kwargs = {"cache_dir": sys.argv[1]} if len(sys.argv) > 1 else {}
    origins.append(rewriter.compile("gemma4", use_shipped=False, **kwargs).origin)
print(*origins)
"""


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_relative_cache_folder_is_hit(tmp_path, how):
    """A relative folder is taken from the current directory once; its entries are then hits and check."""
    args, env = (["rel"], {}) if how == "argument" else ([], {"REWRITER_CACHE_DIR": "rel"})
    result = run_python(COMPILE_TWICE, *args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["compiled", "user_cache"]
    verify = run_python("", "-m", "rewriter", "cache", "verify", "--cache-dir", "rel", cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout
    assert (tmp_path / "rel").is_dir()


def test_empty_cache_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cache_dir is empty"):
        rewriter.compile("gemma4", cache_dir="")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 KiB tmpfs (one page), too small for an entry (root only)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs", folder], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_full_disk_compiles_in_memory_and_leaves_nothing_behind(small_disk):
    for _ in range(2):
        result = run_python(COMPILE_TWICE, str(small_disk))
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["memory", "memory"]
        assert f"not storing the entry in {small_disk}: no space left" in result.stderr
    # whole diffs may stay (content-addressed, for the next try); no entry, and nothing half-written
    left = [path for path in small_disk.iterdir() if path.name != ".locks"]
    assert all(path.suffix == ".diff" and sha256(path.read_bytes()) == path.stem for path in left), left
    verify = run_python("", "-m", "rewriter", "cache", "verify", "--cache-dir", str(small_disk))
    assert verify.returncode == 0 and "bad" not in verify.stdout, verify.stdout


CLEAR_FOREVER = """
import sys
from rewriter.cache import CacheDir
while True:
    CacheDir(sys.argv[1]).clear()
"""


def test_store_racing_a_cache_clear_says_what_happened(tmp_path):
    """``cache clear`` in another process removes a writer's folder while it writes: the error says so."""
    sources = installed_sources()
    key = compile_fresh(tmp_path / "first").key
    entry = CacheDir(tmp_path / "first").read(key, sources)
    components = json.loads(entry.manifest.read_text())["components"]
    cache = CacheDir(tmp_path / "cache")
    clearing = subprocess.Popen([sys.executable, "-c", CLEAR_FOREVER, str(cache.root)], cwd=ROOT)
    try:
        deadline, failure = time.monotonic() + 60, None
        while failure is None and time.monotonic() < deadline:
            try:
                cache.store(key, sources, entry.texts, entry.outcomes, entry.patches, components)
            except OSError as error:
                failure = error
        assert clearing.poll() is None, "the clearing process failed"
    finally:
        clearing.kill()
        clearing.wait()
    if failure is None:
        pytest.skip("the clearing process never removed a folder while an entry was written")
    assert "was removed while the entry was written (a concurrent `cache clear`?)" in str(failure)


def test_other_transformers_source_gets_another_key(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    original = compile_fresh(cache)
    mutated_transformers(tmp_path / "src", monkeypatch, MODELING, "# ---- Vision Encoder Layers ----", "# vision")
    changed = compile_fresh(cache)
    assert changed.key != original.key
    assert changed.origin == "compiled"
    entries = {path.stem for path in cache.glob("*.json")}
    trainer = {rewriter.compiled("trainer").key} if rewriter.compiled("trainer") else set()  # compiled if imported
    assert entries == {original.key, changed.key} | trainer


def test_shipped_entry_patches_without_importing_libcst(tmp_path):
    code = """
import sys, rewriter
report = rewriter.compile("gemma4", cache_dir=sys.argv[1])
assert "libcst" not in sys.modules, "libcst was imported"
print(report.origin)
"""
    result = run_python(code, str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shipped"]
    assert not (tmp_path / "cache").exists()


def test_shipped_entries_are_exactly_what_prebuild_generates(tmp_path):
    """Regenerate every shipped entry from the release wheels; any difference from the committed ones fails."""
    regenerated = CacheDir(tmp_path / "regenerated")
    keys = {key for _, _, key, _ in prebuild(regenerated.root)}
    shipped = shipped_cache()
    assert sorted(keys) == shipped.keys(), "stale shipped entries: run python -m rewriter prebuild"
    for key in shipped.keys():
        assert entry_files(regenerated.manifest(key)) == entry_files(shipped.manifest(key)), key
    diffs = [sorted(path.name for path in root.glob("*.diff")) for root in (regenerated.root, shipped.root)]
    assert diffs[0] == diffs[1], "shipped diffs that no entry uses, or missing ones: run python -m rewriter prebuild"


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_mtime_ns, path.stat().st_size) for path in folder.rglob("*")}


def test_wheel_builds_quietly_fits_1_mib_and_read_only_patches_from_its_shipped_entry_writing_nothing(tmp_path):
    wheel, printed = build_wheel(tmp_path / "wheels")
    assert "warning" not in printed.lower(), printed
    assert wheel.stat().st_size <= 1024 * 1024, f"the wheel is {wheel.stat().st_size:,} bytes, over 1 MiB"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    # torch, transformers and the rest come from the test environment, after the wheel's own files
    dependencies = Path(transformers.__file__).parents[1]
    (site / "test-dependencies.pth").write_text(f"{dependencies}\n")
    for path in [site / "rewriter", *(site / "rewriter").rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    home = tmp_path / "home"
    home.mkdir()
    before = {**tree(venv), **tree(home)}
    code = """
import sys, rewriter
from rewriter import testing
report = rewriter.compile("gemma4")
assert report.origin == "shipped", report
assert "libcst" not in sys.modules
from transformers import StaticCache
assert len(StaticCache(config=testing.text_config(0), max_cache_len=8).layers) == 6
print(report.cache_path)
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("REWRITER_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONNOUSERSITE="1")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(site / "rewriter" / "compiled_cache"))
    assert {**tree(venv), **tree(home)} == before
