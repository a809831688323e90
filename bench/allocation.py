"""Non-uniform sparsity across blocks (OWL) against uniform, at a fixed global ratio.

    python bench/allocation.py                 # 70 %: wanda, sparsegpt, awp+ uniform vs OWL; lambda picked on held-out text
    python bench/allocation.py --report        # rebuild allocation.md from the finished rows

The default model, calibrated as bench/quality.py does (32 x 512 tokens of the Wikipedia leads,
seed 0, sequential). Every row reports two perplexities:

- *held-out*: 32 non-overlapping 512-token windows of the calibration text that no calibration
  window touches (taken from its end). OWL's lambda is chosen on these (Wanda rows), never on
  the evaluation text;
- *evaluation*: the first 64 512-token windows of the Wikipedia articles, as in quality.md.

Each row also checks the global ratio: the zeros the OWL model holds against the uniform model's.
Rows are kept in bench/results/allocation_runs.json (resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import allocation, checkpoints, compress, data, methods, models, perplexity
from awp_jax.models import weights_of

RESULTS = pathlib.Path(__file__).parent / "results"
PLUS = {"init": "sparsegpt", "max_iter": 50, "step_rule": "lambda_max", "step_scale": 1.0, "refit_iters": 50, "refit_damping": 0.1}
LAMBDAS = (0.04, 0.08, 0.12, 0.16)  # the λ sweep (on held-out text, Wanda); OWL's default is 0.08


def heldout_windows(tokens, calib_starts, seqlen, n):
    """``n`` non-overlapping windows from the end of ``tokens`` that no calibration window overlaps."""
    covered = np.zeros(len(tokens), bool)
    for s in calib_starts:
        covered[s : s + seqlen] = True
    out, end = [], len(tokens)
    while len(out) < n and end >= seqlen:
        if not covered[end - seqlen : end].any():
            out.append(tokens[end - seqlen : end])
            end -= seqlen
        else:
            end -= 1
    if len(out) < n:
        raise SystemExit(f"only {len(out)} held-out windows")
    return np.stack(out).astype(np.int32)


def zeros_of(model):
    return int(sum(int(np.sum(np.asarray(b.linear(n).weight[...]) == 0)) for b in model.layers for n in b.LINEARS))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    store_file = out_dir / "allocation_runs.json"
    store = json.loads(store_file.read_text()) if store_file.exists() else {}

    def save():
        tmp = store_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=1))
        os.replace(tmp, store_file)

    S = args.sparsity
    nsamples, seqlen = 32, 512
    model0, tok = checkpoints.load_default()
    cfg, dense = model0.cfg, weights_of(model0)
    ctoks = data.tokenize(tok, data.calibration_text())
    calib = data.calibration_windows(ctoks, nsamples, seqlen, 0)
    starts = np.random.default_rng(0).integers(0, len(ctoks) - seqlen, size=nsamples)  # as calibration_windows draws them
    assert np.array_equal(np.stack([ctoks[s : s + seqlen] for s in starts]), calib)
    held = heldout_windows(ctoks, starts, seqlen, 32)
    ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 512, 64)

    def run(label, method, spec, alloc):
        k = f"{S}|{label}"
        if k in store or args.report:
            return store.get(k)
        print(f"== {label}", file=sys.stderr, flush=True)
        model = models.build(cfg, dense)
        t0 = time.perf_counter()
        con, opt = methods.settings(method, sparsity=S, **spec)
        sp = allocation.allocate(model, calib, S, alloc, progress=True)
        t_alloc = time.perf_counter() - t0
        cons = [dataclasses.replace(con, sparsity=s) for s in sp]
        compress.compress_model(model, calib, method, cons if alloc.rule != "uniform" else con, opt, progress=True)
        secs = time.perf_counter() - t0
        row = {"label": label, "method": method, "rule": alloc.rule, "m": alloc.m, "lam": alloc.lam, "block_sparsity": sp,
               "zeros": zeros_of(model), "seconds": round(secs, 1), "allocation_seconds": round(t_alloc, 1),
               "heldout_ppl": perplexity.perplexity(model, held, batch_size=8).perplexity}
        row["eval_ppl"] = perplexity.perplexity(model, ev, batch_size=8).perplexity
        store[k] = row
        save()
        print(f"   held-out {row['heldout_ppl']:.2f}  evaluation {row['eval_ppl']:.2f}  ({secs:.0f} s)", file=sys.stderr, flush=True)
        return row

    uniform = allocation.Allocation("uniform")
    run("wanda uniform", "wanda", {}, uniform)
    for lam in LAMBDAS:
        run(f"wanda owl lambda={lam}", "wanda", {}, allocation.Allocation("owl", lam=lam))
    done = [store.get(f"{S}|wanda owl lambda={lam}") for lam in LAMBDAS]
    best_lam = LAMBDAS[int(np.argmin([r["heldout_ppl"] if r else np.inf for r in done]))] if all(done) else 0.08
    owl = allocation.Allocation("owl", lam=best_lam)
    for label, method, spec in (("sparsegpt", "sparsegpt", {}), ("awp+ (SparseGPT start, damped CG refit)", "awp", PLUS)):
        run(f"{label} uniform", method, spec, uniform)
        run(f"{label} owl lambda={best_lam}", method, spec, owl)
    write_report(store, S, best_lam, out_dir / "allocation.md")


def write_report(store, S, best_lam, path):
    rows = [r for k, r in store.items() if k.startswith(f"{S}|")]
    lines = [f"# Non-uniform sparsity (OWL) at {S:.0%}: `python bench/allocation.py`", "",
             ("Default model, 32 x 512 calibration tokens (Wikipedia leads, seed 0, sequential). Held-out: 32 x 512 "
             "calibration-text tokens no calibration window touches (lambda is picked here, on the Wanda rows); evaluation: "
             "64 x 512 tokens of the Wikipedia articles (as quality.md). OWL outlier threshold m = 5."), "",
             f"Lambda picked on held-out text: {best_lam}.", "",
             "| method | allocation | block sparsity min..max | zeros (vs uniform) | held-out ppl | evaluation ppl | seconds (allocation) |",
             "|---|---|---|---|---|---|---|"]
    uni = {r["method"]: r for r in rows if r["rule"] == "uniform"}
    for r in rows:
        u = uni.get(r["method"])
        dz = "" if u is None or r is u else f" ({r['zeros'] - u['zeros']:+d})"
        alloc = "uniform" if r["rule"] == "uniform" else f"OWL lambda={r['lam']}"
        lines.append(f"| {r['label'].split(' uniform')[0].split(' owl')[0]} | {alloc} | {min(r['block_sparsity']):.4f}..{max(r['block_sparsity']):.4f} "
                     f"| {r['zeros']}{dz} | {r['heldout_ppl']:.2f} | {r['eval_ppl']:.2f} | {r['seconds']:.0f} ({r['allocation_seconds']:.0f}) |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
