"""Start-up cost of ``rewriter.compile("gemma4")`` in fresh processes, with transformers already imported.

    python benchmarks/startup_bench.py --runs 7 --json benchmarks/results/startup.json

Modes, each timed in its own fresh process per run: ``cold`` (empty user cache, shipped cache off: LibCST runs,
its import included), ``warm`` (a user-cache hit), ``shipped`` (the wheel's entry), ``every_family_shipped``
(``rewriter.compile_on_import()`` with every family's modeling module already imported: one shipped hit each). ``bare_parse`` is
``libcst.parse_module`` of the two source files in a fresh process (LibCST imported first, not timed): the
ratios divide each mode's median by its median, all measured in the same run. ``libcst_import`` is the import of
``libcst`` and ``libcst.matchers`` alone, the part of ``cold`` that no rule can make cheaper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402

COMPILE = """
import json, sys, time
import transformers.models.gemma4.modeling_gemma4, transformers.cache_utils
import rewriter
start = time.perf_counter()
report = rewriter.compile("gemma4", cache_dir=sys.argv[1], use_shipped=sys.argv[2] == "shipped")
print(json.dumps({"seconds": time.perf_counter() - start, "origin": report.origin}))
"""

EVERY_FAMILY = """
import json, sys, time
import transformers.cache_utils
import transformers.models.gemma3.modeling_gemma3, transformers.models.gemma3n.modeling_gemma3n
import transformers.models.gemma4.modeling_gemma4
import rewriter
start = time.perf_counter()
reports = rewriter.compile_on_import(cache_dir=sys.argv[1])
seconds = time.perf_counter() - start
origins = {report.origin for report in reports.values()}
print(json.dumps({"seconds": seconds, "origin": origins.pop() if len(reports) == 3 and len(origins) == 1 else None}))
"""

BARE_PARSE = """
import json, time
import libcst, transformers.cache_utils as c, transformers.models.gemma4.modeling_gemma4 as g
texts = [open(module.__file__).read() for module in (c, g)]
start = time.perf_counter()
for text in texts:
    libcst.parse_module(text)
print(json.dumps({"seconds": time.perf_counter() - start, "origin": "bare_parse"}))
"""

LIBCST_IMPORT = """
import json, time
import transformers.models.gemma4.modeling_gemma4
start = time.perf_counter()
import libcst, libcst.matchers
print(json.dumps({"seconds": time.perf_counter() - start, "origin": "libcst_import"}))
"""

EXPECTED_ORIGIN = {"cold": "compiled", "warm": "user_cache", "shipped": "shipped", "every_family_shipped": "shipped"}


def run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "runs": seconds}


def measure(runs: int) -> dict:
    timings = {mode: [] for mode in ("bare_parse", "libcst_import", "cold", "warm", "shipped", "every_family_shipped")}
    for _ in range(runs):
        timings["bare_parse"].append(run(BARE_PARSE)["seconds"])
        timings["libcst_import"].append(run(LIBCST_IMPORT)["seconds"])
        with tempfile.TemporaryDirectory() as cache:
            for mode in ("cold", "warm", "shipped"):
                result = run(COMPILE, cache, mode)
                assert result["origin"] == EXPECTED_ORIGIN[mode], (mode, result)
                timings[mode].append(result["seconds"])
            result = run(EVERY_FAMILY, cache)
            assert result["origin"] == "shipped", result
            timings["every_family_shipped"].append(result["seconds"])
    results = {mode: summary(seconds) for mode, seconds in timings.items()}
    parse = results["bare_parse"]["median_s"]
    for mode in ("cold", "warm", "shipped"):
        results[mode]["ratio_to_bare_parse"] = results[mode]["median_s"] / parse
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    import transformers

    results = {
        "benchmark": "startup",
        "command": f"python benchmarks/startup_bench.py --runs {args.runs} --json {args.json}",
        "machine": describe_machine(),
        "transformers": transformers.__version__,
        "startup": measure(args.runs),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for mode, figures in results["startup"].items():
        ratio = figures.get("ratio_to_bare_parse")
        print(f"{mode:>10}: {figures['median_s'] * 1000:8.1f} ms" + (f"  ({ratio:.2f}x bare parse)" if ratio else ""))


if __name__ == "__main__":
    main()
