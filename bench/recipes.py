"""The recipes side by side: perplexity and time of ``paper``, ``fast`` and ``best`` against the
baselines, in one process, one after another, so the time ratios hold on whatever machine runs it.

    python bench/recipes.py            # 50 % unstructured and INT4 g128 (about an hour on 2 cores)
    python bench/recipes.py --report   # rebuild recipes.md from the finished rows

Protocol: that of ``bench/quality.py`` (the default model, 32 x 512 calibration tokens of the
Wikipedia leads, sequential; perplexity on the first 64 non-overlapping 512-token windows of the
Wikipedia articles), so each row's perplexity equals quality.md's row with the same settings.
Times are wall and CPU seconds of the whole ``compress_model`` call (calibration forward passes
included); ratios are to the best baseline's CPU seconds in the same run (SparseGPT for pruning,
AWQ for quantization). The machine's float32 matmul rate is measured and printed beside them.
Finished rows are kept in ``bench/results/recipes_runs.json`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import checkpoints, data, methods, recipes  # noqa: E402
from awp_jax.cli import matmul_gflops  # noqa: E402
from awp_jax.models import weights_of  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quality  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
SETTINGS = {"50%": {"sparsity": 0.5}, "INT4 g128": {"bits": 4, "group_size": 128}}
BASELINES = {"50%": ("wanda", "sparsegpt"), "INT4 g128": ("rtn", "awq")}
REFERENCE = {"50%": "sparsegpt", "INT4 g128": "awq"}


def rows():
    """(setting, label, method, flat settings); recipes with the same options share a row."""
    out = []
    for col, fields in SETTINGS.items():
        out += [(col, m, m, dict(fields)) for m in BASELINES[col]]
        constraint = methods.Constraint(**fields)
        seen = {}
        for name in recipes.RECIPES:
            opts = quality.recipe_settings(name, constraint)
            key = json.dumps(opts, sort_keys=True)
            if key in seen:
                seen[key][1].append(name)
                continue
            seen[key] = ({**fields, **opts}, [name])
        out += [(col, "recipe " + " = ".join(names), "awp", flat) for flat, names in seen.values()]
    return out


def write_report(store, gflops_runs, path):
    lines = ["# Recipes side by side: perplexity and time on the default model", "",
             "Command: `python bench/recipes.py`", "",
             "Protocol of bench/quality.py (calibration 32 x 512 tokens of the Wikipedia leads, sequential; perplexity on "
             "64 x 512-token windows of the Wikipedia articles). All rows ran one after another in one process on "
             f"{platform.machine()} with {quality_cores()} CPU core(s); float32 1024x1024 matmul: "
             + ", ".join(f"{g:.0f}" for g in gflops_runs) + " GFLOP/s (measured at the start of each session of rows). "
             "'CPU / ref': CPU seconds of the whole compression (calibration included) over the reference baseline's "
             "in the same run (SparseGPT at 50 %, AWQ at INT4).", ""]
    dense = store.get("dense")
    if dense:
        lines.append(f"Dense perplexity: **{dense:.2f}**")
        lines.append("")
    for col in SETTINGS:
        ref = store.get(f"{col}|{REFERENCE[col]}")
        lines += [f"## {col}", "", "| row | perplexity | wall s | CPU s | CPU / ref |", "|---|---|---|---|---|"]
        for c, lab, _, _ in rows():
            if c != col:
                continue
            r = store.get(f"{col}|{lab}")
            if r is None:
                lines.append(f"| {lab} | not run | | | |")
                continue
            ratio = r["compress_cpu_seconds"] / ref["compress_cpu_seconds"] if ref else float("nan")
            lines.append(f"| {lab} | {r['perplexity']:.2f} | {r['compress_seconds']:.0f} | {r['compress_cpu_seconds']:.0f} | {ratio:.2f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def quality_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    store_file = RESULTS / "recipes_runs.json"
    store = rowstore.load(store_file)
    gflops = store.setdefault("matmul_gflops", [])

    def save():
        rowstore.save(store, store_file)

    if not args.report:
        gflops.append(round(matmul_gflops(), 1))
        model, tok = checkpoints.load_default()
        cfg, dense = model.cfg, weights_of(model)
        calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), 32, 512, 0)
        ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 512, 64)
        if "dense" not in store:
            from awp_jax import perplexity
            from awp_jax.models import Llama

            store["dense"] = perplexity.perplexity(Llama(cfg, dense), ev, batch_size=8).perplexity
            save()
        for col, lab, m, flat in rows():
            k = f"{col}|{lab}"
            if k in store:
                continue
            print(f"== {col} | {lab}: {flat}", file=sys.stderr, flush=True)
            store[k] = {"method": m, "settings": flat, **quality.run_row(cfg, dense, calib, ev, m, flat, "sequential")}
            save()
            write_report(store, gflops, RESULTS / "recipes.md")
            print(f"   perplexity {store[k]['perplexity']:.3f}  ({store[k]['compress_seconds']:.0f} s)", file=sys.stderr, flush=True)
    write_report(store, gflops, RESULTS / "recipes.md")
    print(f"wrote {RESULTS / 'recipes.md'}")


if __name__ == "__main__":
    main()
