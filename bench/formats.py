"""The default model written as GGUF Q4_0: llama.cpp's own round to nearest against methods that
optimise on the Q4_0 grid itself, every row evaluated from the written file.

    python bench/formats.py            # about 30 min on 2 cores
    python bench/formats.py --report   # rebuild gguf.md from the finished rows

With ``llama-cpp-python`` importable (``pip install llama-cpp-python``: it builds llama.cpp from
source), every written GGUF's perplexity is measured by llama.cpp itself too, on the same token
windows (each window evaluated from an empty cache, all positions' logits), beside ours. The GGUFs
are kept in ``~/.cache/awp_jax/bench_gguf/`` for that.

Protocol of ``bench/quality.py``: the default model (SmolLM2-135M, loaded in float32), calibration
32 x 512 tokens of the Wikipedia leads (sequential), perplexity on the first 64 non-overlapping
512-token windows of the Wikipedia articles. Every compressed row is written with
``--format gguf --gguf-type Q4_0`` (the writer reads each tensor back with ``gguf`` and checks it
bit for bit) and its perplexity is measured on the model loaded back from that file. The
``llama.cpp Q4_0`` row is ``gguf.quants.quantize`` of every block matrix (the reference round to
nearest, ``d = max / -8``: what ``llama-quantize`` gives without an importance matrix).

The source weights are dequantized Q4_1 (blocks of 32), so Q4_1 would reproduce them exactly and
prove nothing; Q4_0 (symmetric) is not exact on them and is meaningful. Finished rows are kept in
``bench/results/gguf_runs.json`` (resumable); times are CPU seconds of the whole compression
(calibration included), as a ratio to GPTQ's in the same store.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from awp_jax import assets, checkpoints, compress, data, formats, methods, models, perplexity  # noqa: E402
from awp_jax.cli import matmul_gflops  # noqa: E402
from awp_jax.models import weights_of  # noqa: E402
import rowstore  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
KEEP = pathlib.Path.home() / ".cache" / "awp_jax" / "bench_gguf"
ROWS = {
    "llama.cpp Q4_0 (round to nearest, no calibration)": None,
    "rtn on the Q4_0 grid": ("rtn", {}),
    "awp (paper: RTN start, 10 iterations)": ("awp", {}),
    "gptq on the Q4_0 grid": ("gptq", {}),
    "awp (GPTQ start, 50 iterations, η = 1/λmax)": ("awp", {"init": "gptq", "step_rule": "lambda_max", "step_scale": 1.0, "max_iter": 50}),
}


def llama_cpp_perplexity(path, windows) -> float:
    """Perplexity of a GGUF by llama.cpp itself (llama-cpp-python) on ``windows [N, L]``: each window
    from an empty cache, the mean next-token NLL over all windows' positions (our protocol)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, n_batch=windows.shape[1],
                          n_threads=os.cpu_count(), verbose=False)
    total, count = 0.0, 0
    for win in windows:
        llm.reset()
        llm.eval([int(t) for t in win])
        logits = np.asarray(llm.scores[: len(win) - 1], np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(win) - 1), win[1:]].sum())
        count += len(win) - 1
    return float(np.exp(total / count))


def llama_cpp_q4_0(cfg, dense):
    import gguf

    out = dict(dense)
    model = models.build(cfg, dense)
    for i, blk in enumerate(model.layers):
        for name in blk.LINEARS:
            k = model.linear_key(i, name)
            q = gguf.quants.quantize(np.asarray(dense[k], np.float32), gguf.GGMLQuantizationType.Q4_0)
            out[k] = np.asarray(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0), np.float32).reshape(dense[k].shape)
    return models.build(cfg, out)


def llama_cpp_q4_0_file(source, keep: pathlib.Path):
    """The source GGUF with every block matrix re-quantized to Q4_0 by ``gguf.quants.quantize`` (the
    reference rule llama-quantize applies without an importance matrix), other tensors as they are."""
    import gguf

    keep.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(keep / "model.gguf"), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(2)
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.data.ndim == 2 and "norm" not in t.name:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            writer.add_tensor(t.name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_row(cfg, dense, calib, ev, source, method, opts, keep: pathlib.Path):
    model = models.build(cfg, dense)
    options = methods.make_options(method, **opts)
    con = formats.constrain("gguf", methods.Constraint(bits=4), method, options, model, source=source, gguf_type="Q4_0")
    t0, c0 = time.perf_counter(), time.process_time()
    enc = {}
    compress.compress_model(model, calib, method, con, options, progress=True, encoded=enc)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = formats.save(model, keep, format="gguf", encoded=enc, source=source, gguf_type="Q4_0", overwrite=True)
    size = (out / "model.gguf").stat().st_size
    again, _ = checkpoints.load_model(out / "model.gguf", with_tokenizer=False)
    ppl = perplexity.perplexity(again, ev, batch_size=8).perplexity
    return {"perplexity": ppl, "compress_seconds": round(secs, 1), "compress_cpu_seconds": round(cpu, 1), "gguf_bytes": size,
            "constraint": con.describe()}


SIZES_ROW = "awp (RTN start) INT4 g64, bf16 model: every format"
SIZES_OPTS = {"init": "rtn"}


def sizes_row(calib, ev, source):
    """One compression (INT4 g64 with bf16 scales, the model in bf16: what compressed-tensors
    holds) written in each format that can hold it; sizes, and the perplexity of the model."""
    model, tok = checkpoints.load_model(source, storage_dtype="auto")
    options = methods.make_options("awp", **SIZES_OPTS)
    con = formats.constrain("compressed-tensors", methods.Constraint(bits=4, group_size=64), "awp", options, model)
    enc = {}
    compress.compress_model(model, calib, "awp", con, options, progress=True, encoded=enc)
    out = {"constraint": con.describe(), "perplexity": perplexity.perplexity(model, ev, batch_size=8).perplexity,
           "input_gguf_bytes": pathlib.Path(source).stat().st_size}
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("hf", "orbax", "compressed-tensors"):
            o = formats.save(model, pathlib.Path(d) / fmt, format=fmt, encoded=enc, tokenizer=tok)
            out[fmt] = formats.sizes(o)
    return out


def write_report(store, path):
    lines = ["# GGUF Q4_0 on the default model: llama.cpp's rounding against methods on the Q4_0 grid", "",
             "Command: `python bench/formats.py`", "",
             "Protocol of bench/quality.py: SmolLM2-135M in float32, calibration 32 x 512 tokens of the Wikipedia leads "
             "(sequential), perplexity on 64 x 512-token windows of the Wikipedia articles, measured on the model loaded "
             "back from the written `model.gguf` (each written tensor is read back with `gguf` and checked bit for bit). "
             "The source weights are dequantized Q4_1 (blocks of 32): Q4_1 would reproduce them exactly and prove nothing; "
             "Q4_0 (symmetric) does not. float32 1024x1024 matmul: "
             + ", ".join(f"{g:.0f}" for g in store.get("matmul_gflops", [])) + " GFLOP/s. 'CPU / GPTQ': CPU seconds of the "
             "whole compression (calibration included) over GPTQ's.", ""]
    if "dense" in store:
        lines += [f"Dense perplexity: **{store['dense']:.2f}**", ""]
    ref = store.get("gptq on the Q4_0 grid")
    lines += ["'llama.cpp': the same file's perplexity measured by llama.cpp itself (llama-cpp-python "
              f"{store.get('llama_cpp_version', '?')}, CPU) on the same windows.", "",
              "| row | perplexity | llama.cpp | CPU s | CPU / GPTQ | file MB |", "|---|---|---|---|---|---|"]
    for label in ROWS:
        r = store.get(label)
        if r is None:
            lines.append(f"| {label} | not run | | | | |")
            continue
        cpu = r.get("compress_cpu_seconds")
        ratio = f"{cpu / ref['compress_cpu_seconds']:.2f}" if cpu is not None and ref else ""
        size = f"{r['gguf_bytes'] / 1e6:.1f}" if "gguf_bytes" in r else ""
        lcpp = f"{r['llama_cpp_perplexity']:.2f}" if "llama_cpp_perplexity" in r else ""
        lines.append(f"| {label} | {r['perplexity']:.2f} | {lcpp} | {'' if cpu is None else f'{cpu:.0f}'} | {ratio} | {size} |")
    lines.append("")
    r = store.get(SIZES_ROW)
    if r is not None:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        lines += ["## Sizes of the outputs", "",
                  f"One compression of the default model in bf16 ({r['constraint']}, AWP from RTN, the paper's setting; perplexity "
                  f"{r['perplexity']:.2f} on the windows above) written in each format that holds it. The input GGUF "
                  f"(Q4_1 blocks, Q8_0 embedding) is {mb(r['input_gguf_bytes'])}; the Q4_0 GGUFs are in the table above. "
                  "The embedding (49152 x 576, tied) is not compressed and is 57 MB of every bf16 output.", "",
                  "| format | files | size |", "|---|---|---|"]
        for fmt in ("hf", "orbax", "compressed-tensors"):
            for name, n in r[fmt].items():
                lines.append(f"| {fmt} | {name} | {mb(n)} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    store_file = RESULTS / "gguf_runs.json"
    store = rowstore.load(store_file)

    def save():
        rowstore.save(store, store_file)

    if not args.report:
        store.setdefault("matmul_gflops", []).append(round(matmul_gflops(), 1))
        source = assets.fetch(assets.MODELS["smollm2-135m"])
        model, tok = checkpoints.load_model(source)
        cfg, dense = model.cfg, weights_of(model)
        del model
        calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), 32, 512, 0)
        ev = data.eval_windows(data.tokenize(tok, data.evaluation_text()), 512, 64)
        if "dense" not in store:
            store["dense"] = perplexity.perplexity(models.build(cfg, dense), ev, batch_size=8).perplexity
            save()
        for label, row in ROWS.items():
            if label in store:
                continue
            print(f"== {label}", file=sys.stderr, flush=True)
            keep = KEEP / "".join(ch if ch.isalnum() else "_" for ch in label)[:60]
            if row is None:
                store[label] = {"perplexity": perplexity.perplexity(llama_cpp_q4_0(cfg, dense), ev, batch_size=8).perplexity}
                llama_cpp_q4_0_file(source, keep)
            else:
                store[label] = {"method": row[0], "options": row[1], **run_row(cfg, dense, calib, ev, source, *row, keep)}
            store[label]["file"] = str(keep / "model.gguf")
            save()
            write_report(store, RESULTS / "gguf.md")
            print(f"   perplexity {store[label]['perplexity']:.3f}", file=sys.stderr, flush=True)
        try:
            import llama_cpp

            store["llama_cpp_version"] = llama_cpp.__version__
            for label in ROWS:
                r = store.get(label)
                if r is not None and "llama_cpp_perplexity" not in r and pathlib.Path(r.get("file", "")).is_file():
                    print(f"== llama.cpp: {label}", file=sys.stderr, flush=True)
                    r["llama_cpp_perplexity"] = llama_cpp_perplexity(r["file"], ev)
                    save()
        except ImportError:
            print("llama-cpp-python is not installed: the llama.cpp column stays empty", file=sys.stderr)
        if SIZES_ROW not in store:
            print(f"== {SIZES_ROW}", file=sys.stderr, flush=True)
            store[SIZES_ROW] = sizes_row(calib, ev, source)
            save()
    write_report(store, RESULTS / "gguf.md")
    print(f"wrote {RESULTS / 'gguf.md'}")


if __name__ == "__main__":
    main()
