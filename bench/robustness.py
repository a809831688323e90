"""Out-of-domain robustness of the recipes: the ridge of C, the amount of calibration, and a calibration mix.

    python bench/robustness.py              # every row (resumable)
    python bench/robustness.py --report     # rebuild robustness.md from the finished rows

The default model and the recipes (``fast`` at 50 %, 2:4, INT3 g128 and INT4 g128, ``admm`` at 70 %), calibrated on
512-token windows of the Wikipedia leads (seed 0, sequential), as bench/quality.py does. Each row
changes one thing:

- ``--c-ridge δ`` (every method fits ``C + δ·mean(diag C)·I``; :mod:`awp_jax.calibration`);
- the error-correcting targets (``--error-correction 0.5``; :mod:`awp_jax.targets`), which lowered
  the held-out perplexity in every column of frontier.md but raised the evaluation one at INT3 and 2:4;
- 128 calibration windows instead of 32;
- a calibration mix: 24 Wikipedia-lead windows and 8 windows of Python source (the "calibration"
  half of the standard library's top-level modules, below);
- baselines, for a comparison at equal calibration: SparseGPT (GPTQ for quantization) and Wanda
  (pruning only), with their defaults, on 32 and on 128 windows (their percentages are against the
  recipe's row too).

"as the recipe" is the recipe's method options with no pipeline setting (``recipes.Pipeline``): the
ridge of 0.1 that the recipes' quantization entries took after these rows is the "ridge 0.1" row.

Every row is evaluated on four texts, none of which any calibration window touches:

- *held-out*: 32 windows of the Wikipedia leads that none of the 32- or 128-window draws touch;
- *Wikipedia articles*: the first 64 windows of the evaluation text, as in quality.md;
- *Python reference prose* (out of domain): the 79 topics of the Python language reference that
  ship with the interpreter (``pydoc_data.topics``), sorted by name, joined, first 64 windows;
- *Python source* (out of domain for Wikipedia calibration): the "evaluation" half of the standard
  library's top-level ``*.py`` modules, first 64 windows.

The halves of the standard library: each top-level module file goes to "calibration" or
"evaluation" by the parity of the first byte of the sha256 of its name, so the mix's code and the
evaluated code never share a file (after the mix, Python source is no longer out of domain: its
other half was calibrated on). Both texts come from the interpreter running the bench (its
version and the texts' sha256 are kept with the rows); no text is fetched.

Decision rule, fixed before the rows ran: a knob becomes a recipe default only if it lowers the
perplexity on both out-of-domain texts and raises the held-out perplexity by at most 1 %.
Evaluation texts are never used to pick a setting. The two texts that issue 19 holds back (news,
19th-century fiction) are not used here.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import platform
import sys
import sysconfig
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from awp_jax import assets, checkpoints, compress, data, methods, models, perplexity, recipes  # noqa: E402
from awp_jax.models import weights_of  # noqa: E402
from awp_jax.targets import ErrorCorrection  # noqa: E402
from frontier import heldout_windows  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_NAME = next(k for k, v in assets.MODELS.items() if v is assets.DEFAULT_MODEL)
SEQLEN = 512
COLUMNS = {"50%": ("fast", dict(sparsity=0.5)), "70%": ("admm", dict(sparsity=0.7)),
           "INT3 g128": ("fast", dict(bits=3, group_size=128)), "INT4 g128": ("fast", dict(bits=4, group_size=128)),
           "2:4": ("fast", dict(nm=(2, 4)))}
# (label, c_ridge, error-correction alpha, calibration, method) in the order they run; calibration: number of
# Wikipedia windows, or "mix"; method: None for the recipe's (AWP with the recipe's options), else a baseline
# for comparison at equal calibration: "obs" is SparseGPT for pruning and N:M, GPTQ for quantization (their
# defaults), "wanda" Wanda (pruning and N:M only)
KNOBS = (("as the recipe", None, None, 32, None), ("ridge 0.1", 0.1, None, 32, None), ("targets alpha 0.5", None, 0.5, 32, None),
         ("calibration mix (8 of 32 windows code)", None, None, "mix", None), ("128 calibration windows", None, None, 128, None),
         ("ridge 1", 1.0, None, 32, None),
         ("baseline SparseGPT / GPTQ", None, None, 32, "obs"), ("baseline SparseGPT / GPTQ (128 calibration windows)", None, None, 128, "obs"),
         ("baseline Wanda", None, None, 32, "wanda"), ("baseline Wanda (128 calibration windows)", None, None, 128, "wanda"))
TEXTS = ("held-out", "Wikipedia articles", "Python reference prose", "Python source")


def stdlib_halves() -> dict[str, str]:
    """The standard library's top-level modules, split in two by a hash of the file name."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    halves = {"calibration": [], "evaluation": []}
    for p in sorted(lib.glob("*.py")):
        half = "calibration" if hashlib.sha256(p.name.encode()).digest()[0] % 2 else "evaluation"
        halves[half].append(p.read_text(encoding="utf-8", errors="replace"))
    return {k: "\n\n".join(v) for k, v in halves.items()}


def reference_prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated subset of: " + ", ".join(COLUMNS).replace("%", "%%"))
    ap.add_argument("--knobs", default=",".join(k[0] for k in KNOBS), help="comma-separated subset of the row labels")
    ap.add_argument("--model", default=None, choices=list(assets.MODELS),
                    help="another model of awp_jax.assets.MODELS (default: the default model); its rows go to robustness_<model>.md")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per text, the held-out text's at most 32 "
                    "(default 64; a row measured with another count is refused)")
    args = ap.parse_args(argv)
    slug = "" if args.model in (None, DEFAULT_NAME) else "_" + rowstore.model_slug(args.model)
    store_file = RESULTS / f"robustness{slug}_runs.json"
    report_file = RESULTS / f"robustness{slug}.md"
    store = rowstore.load(store_file)

    def save():
        rowstore.save(store, store_file)

    if not args.report:
        model0, tok = checkpoints.load_default() if not slug else checkpoints.load_model(args.model)
        cfg, dense = model0.cfg, weights_of(model0)
        ctoks = data.tokenize(tok, data.calibration_text())
        draws = {n: data.calibration_starts(len(ctoks), n, SEQLEN, 0) for n in (32, 128)}
        calib = {n: data.calibration_windows(ctoks, n, SEQLEN, 0) for n in (32, 128)}
        held = heldout_windows(ctoks, np.concatenate(list(draws.values())), SEQLEN, min(32, args.windows))
        code = stdlib_halves()
        prose = reference_prose()
        code_calib = data.calibration_windows(data.tokenize(tok, code["calibration"]), 8, SEQLEN, 0)
        calib["mix"] = np.concatenate([calib[32][:24], code_calib])
        texts = {"held-out": held,
                 "Wikipedia articles": data.eval_windows(data.tokenize(tok, data.evaluation_text()), SEQLEN, args.windows),
                 "Python reference prose": data.eval_windows(data.tokenize(tok, prose), SEQLEN, args.windows),
                 "Python source": data.eval_windows(data.tokenize(tok, code["evaluation"]), SEQLEN, args.windows)}
        windows = {k: len(v) for k, v in texts.items()}
        if store.get("setup", {}).get("windows", windows) != windows:
            raise SystemExit(f"{store_file} holds rows measured on {store['setup']['windows']} windows, not {windows}")
        store["setup"] = {"model": args.model or DEFAULT_NAME, "python": platform.python_version(), "prose_sha256": sha(prose),
                          "code_calibration_sha256": sha(code["calibration"]), "code_evaluation_sha256": sha(code["evaluation"]),
                          "windows": windows}
        if "dense" not in store:
            m = models.build(cfg, dense)
            store["dense"] = {t: perplexity.perplexity(m, w, batch_size=8).perplexity for t, w in texts.items()}
            save()
        columns, knobs = args.columns.split(","), set(args.knobs.split(","))
        for label, ridge, alpha, cal, baseline in KNOBS:
            for col in columns:
                recipe, fields = COLUMNS[col]
                k = f"{col}|{label}"
                con = methods.Constraint(**fields)
                method = "awp" if baseline is None else baseline_method(baseline, con)
                if k in store or label not in knobs or method is None:
                    continue
                print(f"== {col} | recipe {recipe} | {label}", file=sys.stderr, flush=True)
                opt = recipes.RECIPES[recipe].options_for(con) if baseline is None else methods.make_options(method)
                model = models.build(cfg, dense)
                t0, c0 = time.perf_counter(), time.process_time()
                ec = None if alpha is None else ErrorCorrection(alpha=alpha)
                compress.compress_model(model, calib[cal], method, con, opt, progress=True, c_ridge=ridge, error_correction=ec)
                row = {"recipe": recipe if baseline is None else None, "method": method, "c_ridge": ridge, "alpha": alpha,
                       "calibration": cal, "seconds": round(time.perf_counter() - t0, 1),
                       "cpu_seconds": round(time.process_time() - c0, 1), "commit": rowstore.code_commit()}
                row.update({t: perplexity.perplexity(model, w, batch_size=8).perplexity for t, w in texts.items()})
                store[k] = row
                save()
                write_report(store, report_file)
                print("   " + "  ".join(f"{t} {row[t]:.2f}" for t in TEXTS) + f"  ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    write_report(store, report_file)
    print(f"wrote {report_file}")


def baseline_method(baseline: str, con) -> str | None:
    """The method a baseline row runs for ``con``; ``None`` where the baseline does not apply."""
    quantized = con.bits is not None
    if baseline == "obs":
        return "gptq" if quantized else "sparsegpt"
    return None if quantized else baseline


def write_report(store, path):
    setup = store.get("setup", {})
    lines = ["# Out-of-domain robustness: the ridge of C, the amount of calibration, a calibration mix: `python bench/robustness.py`"
             + (f" (model `{setup['model']}`)" if setup.get("model", DEFAULT_NAME) != DEFAULT_NAME else ""),
             "", __doc__.split("\n\n", 2)[2].split("Decision rule")[0].strip(), "",
             "Decision rule" + __doc__.split("Decision rule", 1)[1].split("\nEvaluation texts", 1)[0].replace("\n", " "), "",
             f"Texts: Python {setup.get('python')}; reference prose sha256 {setup.get('prose_sha256')}…, source "
             f"(evaluation half) {setup.get('code_evaluation_sha256')}…, source (calibration half) "
             f"{setup.get('code_calibration_sha256')}…; windows {setup.get('windows')}.", ""]
    if "dense" in store:
        lines += ["Dense model: " + ", ".join(f"{t} {store['dense'][t]:.2f}" for t in TEXTS) + ".", ""]
    for col, (recipe, _) in COLUMNS.items():
        rows = [(lab, store[f"{col}|{lab}"]) for lab, *_ in KNOBS if f"{col}|{lab}" in store]
        if not rows:
            continue
        base = store.get(f"{col}|{KNOBS[0][0]}")
        lines += [f"## {col}, recipe `{recipe}`", "", "| row | " + " | ".join(TEXTS) + " | seconds |",
                  "|---|" + "---|" * (len(TEXTS) + 1)]
        for lab, r in rows:
            cells = []
            for t in TEXTS:
                cell = f"{r[t]:.2f}"
                if base is not None and r is not base:
                    cell += f" ({100 * (r[t] / base[t] - 1):+.1f} %)"
                cells.append(cell)
            lines.append(f"| {lab} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
