"""One Llama-2-7B-shaped block compressed on whatever device jax sees: time per block and per layer.

    python bench/scale_device.py --out bench/results/scale_device_cpu.json --methods wanda,sparsegpt,awp5
    python bench/scale_device.py --out OUT.json                      # every method (for a GPU)
    python bench/scale_device.py --report                            # tables into bench/results/scale.md

The block has Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads) and random float32
weights (normal, std 0.02); the calibration windows are 8 x 512 random token ids of a 1024-token
vocabulary (the timings do not depend on the text; quality is measured elsewhere). Each method runs
the whole pipeline (:func:`awp_jax.compress.compress_model`: the calibration forward with the C
accumulation, the solves, the checks and the lossless encoding, one device) twice on a freshly
built block; the second, warm run is reported (the first includes compilation, also reported).

Reported per method: seconds per block, of which the layer solves (the executor's time) and the
rest (forward, statistics, checks, encoding); seconds per layer; for AWP the matmul fraction: the
FLOPs of the iterations' ``(W - Θ) C`` products at the measured float32 rate at the highest
precision (the solver's), over the layers' seconds. The device's matmul rates (float32 at the default and at the highest precision,
bfloat16) are measured first and printed beside the times.

``awp5``: AWP pruning with 5 iterations (as bench/scale.py's CPU rows), ``awp``: the paper's 200
(tolerance 0, so every layer runs all of them), ``gptq`` and ``awp_int4``: INT4 g128.
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

RESULTS = pathlib.Path(__file__).parent / "results"
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128)
RUNS = {  # name: (method, constraint fields, options)
    "wanda": ("wanda", {"sparsity": 0.5}, {}),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5}, {}),
    "awp5": ("awp", {"sparsity": 0.5}, {"max_iter": 5, "tol": 0.0}),
    "awp": ("awp", {"sparsity": 0.5}, {"max_iter": 200, "tol": 0.0}),
    "gptq": ("gptq", {"bits": 4, "group_size": 128}, {}),
    "awp_int4": ("awp", {"bits": 4, "group_size": 128}, {}),
}


def rates() -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    n = 4096
    for name, dtype, prec in (("float32_default", jnp.float32, None), ("float32_highest", jnp.float32, "highest"),
                              ("bfloat16", jnp.bfloat16, None)):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        f = jax.jit(lambda x, y, p=prec: jnp.matmul(x, y, precision=p))
        f(a, a).block_until_ready()
        reps = 3 if jax.default_backend() == "cpu" else 50
        t = time.perf_counter()
        for _ in range(reps):
            r = f(a, a)
        r.block_until_ready()
        out[name] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e9, 1)
    return out


def build(seed: int = 0):
    from awp_jax.models import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=1024, num_layers=1, max_position_embeddings=4096, tie_word_embeddings=True, **SHAPE)
    rng = np.random.default_rng(seed)
    from awp_jax.models import model_class

    w = {k: (1.0 + 0.1 * rng.standard_normal(s, np.float32)) if k.endswith("norm.weight") else 0.02 * rng.standard_normal(s, np.float32)
         for k, s in model_class(cfg).shapes(cfg).items()}
    return Llama(cfg, w)


def run(name: str, windows) -> dict:
    from awp_jax import compress, execution, methods

    method, fields, opts = RUNS[name]
    constraint = methods.Constraint(**fields)
    options = methods.make_options(method, **opts)

    class Timed(execution.Local):
        solve_seconds = 0.0

        def run_group(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().run_group(*a, **k)
            finally:
                Timed.solve_seconds += time.perf_counter() - t

    out = {}
    for attempt in ("cold", "warm"):
        model = build()
        Timed.solve_seconds = 0.0
        t = time.perf_counter()
        rows = compress.compress_model(model, windows, method, constraint, options, progress=False, executor=Timed())
        total = time.perf_counter() - t
        out[attempt] = {"seconds": total, "solve": Timed.solve_seconds, "rest": total - Timed.solve_seconds,
                        "layers": {r["layer"]: {"seconds": r["seconds"], "shape": r["shape"], "iterations": r.get("iterations")}
                                   for r in rows}}
        print(f"{name} {attempt}: {total:.2f} s (solves {Timed.solve_seconds:.2f} s)", file=sys.stderr, flush=True)
        del model
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--report", action="store_true", help="write the tables of every results file into bench/results/scale.md")
    ap.add_argument("--smoke", action="store_true", help="a block 16 times smaller, to check the script")
    args = ap.parse_args(argv)
    if args.smoke:
        SHAPE.update(hidden_size=256, intermediate_size=688, num_heads=2, num_kv_heads=2)
    if args.report:
        report()
        return
    import jax

    dev = jax.devices()[0]
    result = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
              "machine": platform.machine(), "rates_gflops": rates(), "runs": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), file=sys.stderr, flush=True)
    windows = np.random.default_rng(0).integers(0, 1024, (8, 512)).astype(np.int32)
    for name in args.methods.split(","):
        result["runs"][name] = run(name, windows)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def table(res: dict) -> list[str]:
    r = res["rates_gflops"]
    lines = [f"Device: **{res['device']}** ({res['platform']}, jax {res['jax']}); matmul 4096^3: float32 {r['float32_default']:.0f} "
             f"GFLOP/s at the default precision, {r['float32_highest']:.0f} at the highest; bfloat16 {r['bfloat16']:.0f}.", "",
             "| method | s / block (warm) | solves | rest (forward, C, checks, encoding) | first run (compiles) | s / layer: q (4096x4096), gate (11008x4096), down (4096x11008) | AWP matmul fraction (estimated) |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in res["runs"].items():
        w = runs["warm"]
        lay = w["layers"]
        per = ", ".join(f"{lay[n]['seconds']:.3g}" for n in ("q_proj", "gate_proj", "down_proj"))
        frac = ""
        if RUNS[name][0] == "awp":  # the solver's products run at the highest precision (float32 on GPUs and TPUs)
            spent = sum(2 * v["shape"][0] * v["shape"][1] ** 2 * (v["iterations"] or 0) for v in lay.values()) / (r["float32_highest"] * 1e9)
            solve = sum(v["seconds"] for v in lay.values())
            frac = f"{spent / solve:.0%}" if solve else ""
        lines.append(f"| {name} | {w['seconds']:.2f} | {w['solve']:.2f} | {w['rest']:.2f} | {runs['cold']['seconds']:.1f} | {per} | {frac} |")
    return lines


def report():
    path = RESULTS / "scale.md"
    text = path.read_text()
    marker = "## One block on a device"
    text = text.split(marker)[0].rstrip() + "\n\n"
    lines = [marker, "", "Command: `python bench/scale_device.py --out FILE` on each device (one block, random weights and "
             "tokens, two runs per method: the warm one is reported), then `python bench/scale_device.py --report`. "
             "awp5: AWP pruning 50 %, 5 iterations; awp: the paper's 200 (tolerance 0); gptq, awp_int4: INT4 g128. "
             "The AWP matmul fraction is an estimate: the FLOPs of the iterations' (W - Θ)C products (2 d_out d_in^2 each) at the measured float32 rate at the highest precision (the solver's), over the layers' seconds (which include each layer's checks and encoding).", ""]
    for f in sorted(RESULTS.glob("scale_device_*.json")):
        lines += [f"### {f.name}", ""] + table(json.loads(f.read_text())) + [""]
    path.write_text(text + "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
