"""Whole-model compression time on this machine: Wanda, SparseGPT and AWP at 50 %, in one run.

    python bench/compress_time.py                 # default model, 50 % unstructured, 1 repeat
    python bench/compress_time.py --repeats 2     # every method twice, interleaved

The default model (SmolLM2-135M-Instruct, weights dequantized from Q4_1) is loaded once and
calibrated on the same ``--nsamples`` x ``--seqlen`` tokens of the Wikipedia leads (seed 0,
sequential, as the README's main job does) for every method. Each method compresses a fresh copy of
the dense weights with ``compress_model``; the methods run one after another in one process, in
the order given, so the ratios compare like with like on the same machine state. Reported per method:

* wall seconds and CPU seconds (all threads of this process) of the whole ``compress_model`` call:
  the calibration forward passes, the per-layer solves, compilation, encoding and bookkeeping;
* solve seconds: the sum of the per-layer times in the compression report (the solve, the
  lossless encode and the write-back, without the forward passes);
* each of these relative to Wanda's.

The first method pays the one-off compilation of the model's forward pass; a warm-up compression
of one block with Wanda runs first so that no method is charged for it. Compilation of each
method's own solver is included (a user pays it too). No perplexity here: bench/quality.py has it.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import checkpoints, compress, data, methods  # noqa: E402
from awp_jax.models import Llama, weights_of  # noqa: E402

S = dict  # flat settings: methods.settings(method, **s) splits them into constraint and options
MOMENTUM50 = "awp (momentum, η=1/λmax, 50 it)"
DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "compress_time.md"


def short(n: int) -> str:
    """The label of ``n`` momentum iterations from Wanda's mask followed by 10 damped CG refit iterations."""
    return f"awp (momentum, η=1/λmax, {n} it, damped CG refit 10)"


ADMM = "awp admm (ALPS settings)"


def configs(p):
    return {
        "wanda": ("wanda", S(sparsity=p)),
        "sparsegpt": ("sparsegpt", S(sparsity=p)),
        "awp (paper settings)": ("awp", S(sparsity=p)),
        MOMENTUM50: ("awp", S(sparsity=p, max_iter=50, momentum=True, step_rule="lambda_max", step_scale=1.0)),
        **{short(n): ("awp", S(sparsity=p, max_iter=n, momentum=True, step_rule="lambda_max", step_scale=1.0, refit_iters=10,
                               refit_damping=0.1)) for n in (20, 10, 5)},
        "awp+ (SparseGPT start, damped CG refit)": ("awp", S(sparsity=p, init="sparsegpt", max_iter=50, step_rule="lambda_max",
                                                             step_scale=1.0, refit_iters=50, refit_damping=0.1)),
        ADMM: ("awp", S(sparsity=p, algorithm="admm", scope="layer", refit_iters=10, refit_damping=0.01)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=None, help="labels to run (default: all)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    table = configs(args.sparsity)
    labels = args.methods or list(table)
    unknown = [lab for lab in labels if lab not in table]
    if unknown:
        ap.error(f"unknown method label(s) {unknown}; choose from {list(table)}")
    if "wanda" not in labels:
        ap.error("the ratios are relative to wanda: include it in --methods")

    model, tok = checkpoints.load_default()
    cfg, dense = model.cfg, weights_of(model)
    calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), args.nsamples, args.seqlen, 0)

    # warm-up: compile the forward pass used by calibration on a one-block model, not charged to anyone
    one = dataclasses.replace(cfg, num_layers=1)
    first = {k: v for k, v in dense.items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    compress.compress_model(Llama(one, first), calib, "wanda", *methods.settings("wanda", sparsity=args.sparsity), progress=False)

    runs = {lab: [] for lab in labels}
    for r in range(args.repeats):
        for lab in labels:
            m, spec = table[lab]
            print(f"== repeat {r + 1}/{args.repeats}: {lab}", file=sys.stderr, flush=True)
            mdl = Llama(cfg, dense)
            t0, c0 = time.perf_counter(), time.process_time()
            report = compress.compress_model(mdl, calib, m, *methods.settings(m, **spec), progress=True)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            solve = float(sum(row["seconds"] for row in report))
            runs[lab].append({"wall": wall, "cpu": cpu, "solve": solve,
                              "rel_objective": float(np.mean([row["rel_objective"] for row in report]))})
            print(f"   {wall:.1f} s wall, {cpu:.1f} s CPU, {solve:.1f} s in the per-layer solves", file=sys.stderr, flush=True)

    med = {lab: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for lab, rs in runs.items()}
    base = med["wanda"]
    cmd = "python bench/compress_time.py" + (f" --sparsity {args.sparsity}" if args.sparsity != 0.5 else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 1 else "") + \
        (f" --nsamples {args.nsamples}" if args.nsamples != 32 else "") + (f" --seqlen {args.seqlen}" if args.seqlen != 512 else "") + \
        (" --methods " + " ".join(f"'{lab}'" for lab in labels) if args.methods else "") + \
        (f" --out {args.out}" if pathlib.Path(args.out).resolve() != DEFAULT_OUT.resolve() else "")
    lines = [f"# Whole-model compression time: {args.sparsity:.0%} unstructured, default model", "",
             f"Command: `{cmd}`", "",
             f"Default model (SmolLM2-135M-Instruct, dequantized Q4_1), {cfg.num_layers} blocks x 7 linear layers; "
             f"calibration {args.nsamples} x {args.seqlen} tokens of the Wikipedia leads, sequential. Methods ran one after "
             f"another in one process ({args.repeats} repeat(s), interleaved; median shown) on {platform.machine()} with "
             f"{_cores()} CPU core(s) available. 'wall'/'CPU': the whole compress_model call (forward passes included); "
             "'solve': sum of the report's per-layer seconds. Ratios are to Wanda in the same run, and (wall) to SparseGPT.", "",
             "| method | wall s | CPU s | solve s | wall / wanda | CPU / wanda | solve / wanda | wall / sparsegpt | mean rel. objective |",
             "|---|---|---|---|---|---|---|---|---|"]
    sgpt = med.get("sparsegpt")
    for lab in labels:
        x = med[lab]
        lines.append(f"| {lab} | {x['wall']:.1f} | {x['cpu']:.1f} | {x['solve']:.1f} | {x['wall'] / base['wall']:.2f} | "
                     f"{x['cpu'] / base['cpu']:.2f} | {x['solve'] / base['solve']:.2f} | "
                     f"{(x['wall'] / sgpt['wall']) if sgpt else float('nan'):.2f} | {x['rel_objective']:.4f} |")
    if args.repeats > 1:
        lines += ["", "Every repeat (wall s): " + "; ".join(f"{lab}: " + ", ".join(f"{x['wall']:.1f}" for x in runs[lab]) for lab in labels)]
    text = "\n".join(lines) + "\n"
    print(text)
    pathlib.Path(args.out).write_text(text)


def _cores():
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
