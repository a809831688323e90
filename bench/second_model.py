"""A second opinion: the quality benchmark's protocol on another real model.

    python bench/second_model.py                                # qwen2.5-coder-0.5b, every row (about 2 h on 2 cores; resumable)
    python bench/second_model.py --model gemma-3-270m
    python bench/second_model.py --report                       # rebuild the results file from the finished rows

For a named model of :data:`awp_jax.assets.MODELS` (fetched on first use):

1. The dense model is checked against transformers (PyTorch, float32, the same GGUF file dequantized
   by transformers' own GGUF loader): the largest logit difference on one evaluation window and both
   perplexities on the evaluation windows. Needs torch and accelerate (``pip install '.[bench]'``).
2. The rows of ``bench/quality.py``'s protocol — calibration 32 x 512 tokens of the Wikipedia leads
   (seed 0, sequential), perplexity on the first 64 non-overlapping 512-token windows of the full
   Wikipedia articles — for 50 % and 2:4 pruning and INT4 / INT3 group-128 quantization: the
   baselines, and AWP with the ``fast`` (default) and ``best`` recipes' options.

Results: ``bench/results/second_model_<model>.md`` (finished rows in ``..._runs.json``). Times are
wall and CPU seconds of the whole ``compress_model`` call, one row after another in one process;
the float32 matmul rate is measured at the start of every session of rows and printed beside them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import assets, checkpoints, data, methods, models, perplexity  # noqa: E402
from awp_jax.cli import matmul_gflops  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quality  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
SETTINGS = {"50%": {"sparsity": 0.5}, "2:4": {"nm": (2, 4)}, "INT4 g128": {"bits": 4, "group_size": 128},
            "INT3 g128": {"bits": 3, "group_size": 128}}
BASELINES = {"50%": ("magnitude", "wanda", "sparsegpt"), "2:4": ("wanda", "sparsegpt"),
             "INT4 g128": ("rtn", "gptq", "awq"), "INT3 g128": ("rtn", "gptq", "awq")}
ORDER = ("50%", "INT4 g128", "2:4", "INT3 g128")


def rows():
    """(column, label, method, flat settings) in the order they run: for each column pair, the two
    strongest baselines and the default recipe first, then the rest; recipes with the same options
    share a row."""
    per_col = {}
    for col in ORDER:
        fields = SETTINGS[col]
        base = [(col, m, m, dict(fields)) for m in BASELINES[col]]
        constraint = methods.Constraint(**fields)
        seen = {}
        for name in ("fast", "best"):
            opts = quality.recipe_settings(name, constraint)
            key = json.dumps(opts, sort_keys=True)
            if key in seen:
                seen[key][1].append(name)
                continue
            seen[key] = ({**fields, **opts}, [name])
        awp = [(col, "awp, recipe " + " = ".join(names), "awp", flat) for flat, names in seen.values()]
        per_col[col] = (base[-2:] + awp[:1], base[:-2] + awp[1:])  # (first, later)
    out = []
    for pair in (ORDER[:2], ORDER[2:]):
        for col in pair:
            out += per_col[col][0]
        for col in pair:
            out += per_col[col][1]
    return out


def transformers_check(path, ev):
    """Logits of transformers' own load of the GGUF file on ``ev[0]``, and its perplexity on ``ev``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(path)
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    m.eval()
    nll, count, first = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, len(ev), 4):
            x = torch.as_tensor(np.asarray(ev[i : i + 4], np.int64))
            logits = m(x).logits.float()
            if first is None:
                first = logits[0].numpy()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0]
            nll -= float(lp.sum())
            count += lp.numel()
    return first, float(np.exp(nll / count))


def _label_order(col, label):
    names = list(BASELINES[col])
    return names.index(label) if label in names else len(names) + ("best" in label and "fast" not in label)


def set_aside_earlier(store):
    """Move each stored AWP row measured with options its recipe no longer has to a key naming those
    options (kept and reported as such, never under a recipe name it no longer matches), so that a run
    measures the recipe as it is now."""
    current = {f"{c}|{lab}": flat for c, lab, _, flat in rows()}
    for k in [k for k in store if "|" in k]:
        r, (col, lab) = store[k], k.split("|", 1)
        if r.get("method") != "awp" or k not in current:
            continue
        settings = {k2: tuple(v) if isinstance(v, list) else v for k2, v in r["settings"].items()}
        if settings != current[k]:
            opts = ", ".join(f"{k2}={v}" for k2, v in settings.items() if k2 not in SETTINGS[col])
            store[f"{col}|{lab}'s earlier options ({opts})"] = store.pop(k)


def write_report(name, store, path):
    gflops = store.get("matmul_gflops", [])
    lines = [f"# Second model: {name}", "",
             f"Command: `python bench/second_model.py --model {name}`", "",
             f"Model file: `{assets.MODELS[name].filename}` (sha256 {assets.MODELS[name].sha256[:16]}…). Its weights are "
             "**dequantized from a GGUF of mixed block types** (listed below): they already lie on coarse grids, so "
             "quantization error is measured against a model that was itself quantized, and the gaps between "
             "methods are those of re-compressing it, not of compressing the original bf16 release.", "",
             "Protocol of bench/quality.py: calibration 32 x 512 tokens of the Wikipedia leads (seed 0, sequential); perplexity "
             "on the first 64 non-overlapping 512-token windows of the full Wikipedia articles (the texts never mix). "
             f"Rows ran one after another in one process on {platform.machine()} with {quality.os.cpu_count()} CPU core(s); "
             "float32 1024x1024 matmul: " + (", ".join(f"{g:.0f}" for g in gflops) or "–") + " GFLOP/s (measured at the start of "
             "each session of rows). Quantization uses group 128 with a shorter last group where a width is not a multiple of it.", ""]
    cached = assets.cache_dir() / assets.MODELS[name].filename
    if cached.exists():
        import gguf

        field = gguf.GGUFReader(str(cached)).fields.get("general.name")
        if field is not None:
            lines += [f"The file's `general.name`: {field.contents()!r}" + (
                " — it was converted from the AWQ (4-bit) release, so its weights passed through AWQ's grid before "
                "llama.cpp's, and 4-bit results on it are not those of the bf16 model." if "AWQ" in str(field.contents()) else "."), ""]
    lines += ["Rows ran beside other work on the same 2 cores (the test suite, memory measurements): wall seconds are "
              "inflated and only roughly comparable; CPU seconds of the benchmark process are the better time figure.", ""]
    if "types" in store:
        lines += ["Block types in the file: " + ", ".join(f"{k} {v}" for k, v in sorted(store["types"].items())) + ".", ""]
    d = store.get("dense")
    if d:
        lines += ["## Dense model against transformers", "",
                  "| | perplexity | max abs logit difference (window 0) | seconds |", "|---|---|---|---|",
                  f"| awp_jax | {d['perplexity']:.4f} | | {d['seconds']:.0f} |"]
        if "transformers_perplexity" in d:
            lines.append(f"| transformers (GGUF load, fp32) | {d['transformers_perplexity']:.4f} | {d['max_logit_diff']:.2e} "
                         f"(logit scale {d['logit_scale']:.1f}) | {d['transformers_seconds']:.0f} |")
        else:
            lines.append(f"| transformers | not run: {d.get('transformers_error', 'no torch')} | | |")
        lines.append("")
    for col in ORDER:
        ref_name = BASELINES[col][-1]
        ref = store.get(f"{col}|{ref_name}")
        lines += [f"## {col}", "", f"| row | perplexity | wall s | CPU s | CPU / {ref_name} | GFLOP/s of its session |",
                  "|---|---|---|---|---|---|"]
        # the rows of the recipes as they are now, then stored rows measured with a recipe's earlier options
        labels = [lab for c, lab, _, _ in rows() if c == col]
        labels += [k.split("|", 1)[1] for k in store if k.startswith(col + "|") and k.split("|", 1)[1] not in labels]
        got, marked = [], False
        for lab in sorted(labels, key=lambda lab: _label_order(col, lab)):
            r = store.get(f"{col}|{lab}")
            if r is None:
                lines.append(f"| {lab} | not run | | | | |")
                continue
            ratio = f"{r['compress_cpu_seconds'] / ref['compress_cpu_seconds']:.2f}" if ref else f"({ref_name} not run)"
            rate = r.get("matmul_gflops")
            if ref and (rate is None or rate != ref.get("matmul_gflops")) and r is not ref:
                ratio, marked = ratio + " *", True
            lines.append(f"| {lab} | {r['perplexity']:.2f} | {r['compress_seconds']:.0f} | {r['compress_cpu_seconds']:.0f} | {ratio} | "
                         f"{'–' if rate is None else f'{rate:.0f}'} |")
            got.append((r["perplexity"], lab))
        if marked:
            lines += ["", f"\\* measured in another session than the {ref_name} row (or in one whose matmul rate was not kept with "
                      "the row, –): these machines' speed differs by up to 4x between days, so such a ratio compares days as "
                      "much as methods."]
        if got:
            of = "" if len(got) == len(labels) else f" of the {len(got)} of {len(labels)} rows run"
            lines += ["", f"Lowest perplexity{of}: {min(got)[1]} ({min(got)[0]:.2f})."]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=list(assets.MODELS))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true", help="do not run the transformers check")
    ap.add_argument("--columns", default=",".join(ORDER), help="comma-separated subset of: " + ", ".join(ORDER).replace("%", "%%"))
    ap.add_argument("--remeasure", default="", help="comma-separated row labels (e.g. gptq,awq) of the chosen columns to "
                    "measure again in this run, so that their times sit beside the new rows' (the old values are replaced)")
    args = ap.parse_args(argv)
    slug = rowstore.model_slug(args.model)
    store_file = RESULTS / f"second_model_{slug}_runs.json"
    report = RESULTS / f"second_model_{slug}.md"
    store = rowstore.load(store_file)
    set_aside_earlier(store)
    for col in args.columns.split(","):
        for lab in filter(None, args.remeasure.split(",")):
            old = store.pop(f"{col}|{lab}", None)
            if old is not None:
                print(f"remeasuring {col} | {lab} (stored perplexity {old['perplexity']:.3f})", file=sys.stderr)

    def save():
        rowstore.save(store, store_file)

    if not args.report:
        store.setdefault("matmul_gflops", []).append(round(matmul_gflops(), 1))
        path = checkpoints.model_source(args.model)
        import gguf
        from collections import Counter

        store["types"] = dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))
        model, tok = checkpoints.load_model(args.model)
        cfg, dense = model.cfg, models.weights_of(model)
        calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), 32, 512, 0)
        ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 512, 64)
        if "dense" not in store:
            t0 = time.perf_counter()
            store["dense"] = {"perplexity": perplexity.perplexity(model, ev, batch_size=8).perplexity,
                              "seconds": time.perf_counter() - t0}
            save()
        if "transformers_perplexity" not in store["dense"] and not args.skip_transformers:
            try:
                t0 = time.perf_counter()
                ref_logits, ref_ppl = transformers_check(path, ev)
                ours = np.asarray(models.forward(model)(ev[:1]))[0]
                store["dense"].update(transformers_perplexity=ref_ppl, max_logit_diff=float(np.max(np.abs(ours - ref_logits))),
                                      logit_scale=float(np.max(np.abs(ref_logits))), transformers_seconds=time.perf_counter() - t0)
            except (ImportError, ValueError) as e:  # no torch, or no accelerate (transformers' GGUF loading needs it)
                store["dense"]["transformers_error"] = f"{type(e).__name__}: {e}"
                print(f"transformers check not run: {e}", file=sys.stderr)
            save()
        del model
        wanted = set(args.columns.split(","))
        for col, lab, m, flat in rows():
            k = f"{col}|{lab}"
            if k in store or col not in wanted:
                continue
            print(f"== {col} | {lab}: {flat}", file=sys.stderr, flush=True)
            store[k] = {"method": m, "settings": {k2: list(v) if isinstance(v, tuple) else v for k2, v in flat.items()},
                        **quality.run_row(cfg, dense, calib, ev, m, flat, "sequential"),
                        "matmul_gflops": store["matmul_gflops"][-1]}  # this session's rate, beside the row's times
            save()
            write_report(args.model, store, report)
            print(f"   perplexity {store[k]['perplexity']:.3f}  ({store[k]['compress_seconds']:.0f} s)", file=sys.stderr, flush=True)
    write_report(args.model, store, report)
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
