"""Does AWP's lead depend on the calibration set? Calibration size and sequential vs parallel.

    python bench/calibration.py            # 50 % unstructured: SparseGPT vs AWP (momentum, 50 it)

Same model, evaluation windows and perplexity as ``bench/quality.py`` (64 x 512-token windows of the
full Wikipedia articles); only the calibration changes: ``n`` windows of 512 tokens of the Wikipedia
leads (seed 0) for n in ``--sizes``, calibrated sequentially (every block sees the compressed blocks
before it: the default) and, at 32 windows, in parallel (every block sees the dense model's
activations). AWP runs in its fast setting (momentum, η = 1/λmax, 50 iterations; the same perplexity
as the paper's settings at 50 % in quality.md, in a quarter of the time). Finished rows are kept in
``bench/results/calibration_runs.json`` (resumable); ``bench/results/calibration.md`` is rewritten
after every row.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import checkpoints, data  # noqa: E402
from awp_jax.models import weights_of  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quality  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
S = dict  # flat settings: quality.run_row splits them into constraint and options (methods.settings)


def configs(p):
    return {"sparsegpt": ("sparsegpt", S(sparsity=p)),
            quality.MOMENTUM50: ("awp", S(sparsity=p, max_iter=50, **quality.MOMENTUM))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    args = ap.parse_args(argv)
    table = configs(args.sparsity)
    # the default (32, sequential) last: quality.md already has its rows (the same settings)
    settings = [(n, "sequential") for n in args.sizes if n != 32] + ([(32, "parallel"), (32, "sequential")] if 32 in args.sizes else [])
    store_file = RESULTS / "calibration_runs.json"
    store = rowstore.load(store_file)

    model, tok = checkpoints.load_default()
    cfg, dense = model.cfg, weights_of(model)
    calib_tokens = data.tokenize(tok, data.calibration_text())
    ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), args.eval_seqlen, args.eval_windows)

    def k(lab, n, mode):
        return json.dumps([lab, n, mode, args.seqlen, args.sparsity, args.eval_windows, args.eval_seqlen])

    def report():
        lines = [f"# Calibration size and mode: {args.sparsity:.0%} unstructured, default model", "",
                 "Command: `python bench/calibration.py`", "",
                 f"Calibration: n x {args.seqlen} tokens of the Wikipedia leads ({len(calib_tokens)} tokens in all), seed 0. "
                 f"Perplexity: the first {args.eval_windows} non-overlapping {args.eval_seqlen}-token windows of the full "
                 "Wikipedia articles, as in quality.md. Cells: perplexity (mean relative layer objective over all 210 layers, "
                 "on each layer's own calibration C). 2 CPU cores.", "",
                 "| calibration | " + " | ".join(table) + " | AWP / SparseGPT perplexity |", "|---|" + "---|" * (len(table) + 1)]
        for n, mode in settings:
            got = [store.get(k(lab, n, mode)) for lab in table]
            cells = [f"{g['perplexity']:.2f} ({np.mean(list(g['rel_objective'].values())):.4f})" if g else "not run" for g in got]
            ratio = f"{got[1]['perplexity'] / got[0]['perplexity']:.3f}" if all(got) else "–"
            lines.append(f"| {n} x {args.seqlen}, {mode} | " + " | ".join(cells) + f" | {ratio} |")
        (RESULTS / "calibration.md").write_text("\n".join(lines) + "\n")

    for n, mode in settings:
        calib = data.calibration_windows(calib_tokens, n, args.seqlen, 0)
        for lab, (m, spec) in table.items():
            if k(lab, n, mode) in store:
                continue
            print(f"== {n} x {args.seqlen} {mode} | {lab}", file=sys.stderr, flush=True)
            store[k(lab, n, mode)] = quality.run_row(cfg, dense, calib, ev, m, spec, mode)
            rowstore.save(store, store_file)
            print(f"   perplexity {store[k(lab, n, mode)]['perplexity']:.3f}", file=sys.stderr, flush=True)
            report()
    report()
    print((RESULTS / "calibration.md").read_text())


if __name__ == "__main__":
    main()
