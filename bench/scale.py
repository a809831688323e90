"""Host memory and time of a streamed run on Llama-2-7B-shaped blocks, against the number of blocks.

    python bench/scale.py                       # about 30 minutes on 2 cores; needs ~5 GB of disk
    python bench/scale.py --blocks 4 --methods wanda
    python bench/scale.py --devices 8 --methods wanda   # the same runs on 8 fake CPU devices (--mesh auto)
    python bench/scale.py --devices 8 --blocks 4 --methods wanda --batch-size 2   # 2 windows per forward pass
                                                # (default: the CLI's, 2 on 8 fake devices)

A synthetic Llama checkpoint with Llama-2-7B's block shapes (hidden 4096, intermediate 11008, 32
heads; the default model's tokenizer and vocabulary, 49152) and random weights is written to disk
in bfloat16 with 4 and with 8 blocks. Each setting runs ``awp-jax compress --stream`` in a child
process (calibration 8 x 512 tokens of the Wikipedia leads, sequential; no evaluation) — Wanda on
both, AWP with a few iterations on the smaller — and reports:

* peak resident memory (``VmHWM``) of the whole run, next to the bound it must stay under: twice
  one block in float32 plus its C matrices and the calibration activations, plus the outer tensors
  (embedding) in float32 and the process's own baseline (the interpreter, jax and the tokenizer,
  measured by the same child exiting before it loads the model);
* wall seconds per block and the split of the run: loading blocks from disk, the calibration
  forward (with the C accumulation), the solves, writing the output.

``--devices N``: the runs see N fake CPU devices (``--xla_force_host_platform_device_count``), so
the CLI's ``--mesh auto`` shards the blocks' parameters, the calibration forward and the solves over
them; the devices share this host's memory and cores, so the peak is comparable with one device's
and the time is the cost of the partitioning, not a speed-up.

Results: bench/results/scale.md. The float32 matmul rate of this machine is measured at the start
and printed beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import rowstore  # noqa: E402  (bench/, the script's own directory)

RESULTS = pathlib.Path(__file__).parent / "results"
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128)

# runs in the child: the CLI with timers around loading, solving and writing
CHILD = r"""
import json, sys, time
from awp_jax import compress, formats, memory, methods, runstore, streaming
times = {"load": 0.0, "solve": 0.0, "write": 0.0}
def timed(key, fn):
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[key] += time.perf_counter() - t
    return wrapped
streaming.StreamedModel._build = timed("load", streaming.StreamedModel._build)
runstore.RunStore.load_linears = timed("load", runstore.RunStore.load_linears)
methods.compress_layer = timed("solve", methods.compress_layer)
methods.compress_layers = timed("solve", methods.compress_layers)
methods.compress_on_mesh = timed("solve", methods.compress_on_mesh)
formats.save = timed("write", formats.save)
if sys.argv[1] == "--baseline":
    from awp_jax import checkpoints, data
    from awp_jax.cli import main  # noqa: F401 (the imports a run has)
    tok = checkpoints.model_tokenizer(sys.argv[2])
    data.calibration_windows(data.tokenize(tok, data.load_text("calibration")), 8, 512, 0)
    print("RESULT", json.dumps({"peak_mb": memory.peak_rss_mb()}))
    sys.exit(0)
from awp_jax.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print("RESULT", json.dumps({"peak_mb": memory.peak_rss_mb(), "seconds": time.perf_counter() - t0, **times}))
sys.exit(rc)
"""


def write_checkpoint(path: pathlib.Path, blocks: int, seed: int = 0) -> None:
    """A random bf16 Llama with 7B-shaped blocks, written block by block (never whole in memory)."""
    from awp_jax import assets, checkpoints, dtypes
    from awp_jax.formats.hf import write_safetensors
    from awp_jax.models import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, num_layers=blocks, tie_word_embeddings=True, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, storage_dtype="bfloat16", **SHAPE)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    shapes = Llama.shapes(cfg)
    rng = np.random.default_rng(seed)

    def get(name):
        shp = shapes[name]
        if name.endswith("norm.weight"):
            x = 1.0 + 0.1 * rng.standard_normal(shp, np.float32)
        else:  # scaled like a trained model's: unit-variance outputs for unit-variance inputs
            x = rng.standard_normal(shp, np.float32) / np.sqrt(shp[-1])
        return x.astype(dtypes.np_dtype("bfloat16"))

    write_safetensors(path, {k: (s, "bfloat16") for k, s in shapes.items()}, get, max_shard_size="2GB")
    checkpoints.load_tokenizer(assets.fetch(assets.DEFAULT_MODEL)).save_pretrained(str(path))


class Deadlock(RuntimeError):
    """XLA's CPU collectives gave up waiting: with many fake devices on 2 cores, one replica group's threads
    occasionally never reach a collective the others wait in, and XLA aborts after its 40 s rendezvous limit
    (tests/conftest.py's run_on_fake_devices retries the same)."""


def child(args: list[str], devices: int = 1) -> dict:
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        kind = Deadlock if "Termination timeout" in res.stderr and "rendezvous" in res.stderr else RuntimeError
        raise kind(f"child failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.split("RESULT", 1)[1].strip().splitlines()[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default="4,8")
    ap.add_argument("--methods", default="wanda,awp")
    ap.add_argument("--awp-iters", type=int, default=5)
    ap.add_argument("--devices", type=int, default=1, help="fake CPU devices the runs see (default 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="the CLI's --batch-size: calibration windows per forward pass "
                    "(default: the CLI's, 8 on one device, 8 / devices (at least 2) on fake devices, which share the host's memory); "
                    "the forward's temporaries grow with it")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    args = ap.parse_args(argv)
    from awp_jax import execution
    from awp_jax.cli import matmul_gflops
    from awp_jax.models import Llama, LlamaConfig

    gflops = matmul_gflops()
    print(f"float32 matmul: {gflops:.0f} GFLOP/s", flush=True)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="awp-scale-"))
    cfg1 = LlamaConfig(vocab_size=49152, num_layers=1, tie_word_embeddings=True, **SHAPE)
    block = sum(int(np.prod(s)) for s in Llama.Block.shapes(cfg1, 0).values()) * 4 / 2**20
    D, F, T = SHAPE["hidden_size"], SHAPE["intermediate_size"], 8 * 512
    stats = (3 * D * D + F * F) * 4 / 2**20
    acts = 2 * T * D * 4 / 2**20
    outer = 49152 * D * 4 / 2**20
    store = RESULTS / "scale_runs.json"
    rows = json.loads(store.read_text()).get("rows", []) if store.exists() else []  # finished rows are kept: resumable
    previous = json.loads(store.read_text()).get("previous", []) if store.exists() else []  # earlier versions' rows, newest first
    base = json.loads(store.read_text()).get("baseline_mb") if store.exists() else None
    # the CLI's default on --mesh auto (execution.OnMesh.windows_per_pass: model = devices, stack 1); checked after each run
    per_pass = args.batch_size or (execution.shared_memory_windows(args.devices) if args.devices > 1 else execution.WINDOWS_PER_PASS)
    try:
        for n in [int(b) for b in args.blocks.split(",")]:
            ckpt = work / f"llama7b-shaped-{n}"
            if not ckpt.exists():
                t = time.perf_counter()
                write_checkpoint(ckpt, n)
                print(f"wrote {ckpt} ({n} blocks) in {time.perf_counter() - t:.0f} s", flush=True)
            if base is None:
                base = child(["--baseline", str(ckpt)])["peak_mb"]
            for method in args.methods.split(","):
                if method == "awp" and n != min(int(b) for b in args.blocks.split(",")):
                    continue  # AWP's iterations cost the same per block: run on the smallest checkpoint only
                if any(r["blocks"] == n and r["method"] == method and r.get("devices", 1) == args.devices
                       and r.get("batch_size", 8) == per_pass for r in rows):
                    continue
                out = work / f"out-{n}-{method}"
                cmd = ["compress", "--stream", "--model", str(ckpt), "--method", method, "--sparsity", "0.5",
                       "--nsamples", "8", "--seqlen", "512", "--eval-windows", "0", "--out", str(out)]
                cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
                if method == "awp":
                    cmd += ["--max-iter", str(args.awp_iters)]
                for attempt in range(1, 4):  # each attempt from scratch: an unfinished run's blocks would be resumed
                    for d in (out, out.parent / f".{out.name}.run"):
                        shutil.rmtree(d, ignore_errors=True)
                    try:
                        r = child(cmd, args.devices)
                        break
                    except Deadlock as e:
                        if attempt == 3:
                            raise
                        print(f"attempt {attempt}: XLA's CPU collectives deadlocked, running again ({str(e)[-300:]})", flush=True)
                r["attempts"] = attempt
                ran = json.loads((out / "awp_report.json").read_text())["calibration"]["windows_per_pass"]
                if ran != per_pass:
                    raise RuntimeError(f"the run took {ran} windows per pass, expected {per_pass}")
                r.update(blocks=n, method=method, devices=args.devices, batch_size=per_pass, forward=r["seconds"] - r["load"] - r["solve"] - r["write"], gflops=gflops,
                         commit=rowstore.code_commit())
                rows.append(r)
                RESULTS.mkdir(exist_ok=True)
                store.write_text(json.dumps({"baseline_mb": base, "rows": rows, **({"previous": previous} if previous else {})}, indent=2))
                print(json.dumps(r), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    bound = base + outer + 2 * block + stats + acts
    lines = [
        "# Streaming on Llama-2-7B-shaped blocks",
        "",
        "Command: `python bench/scale.py` (see its docstring). Random bf16 checkpoints with Llama-2-7B's block "
        f"shapes (hidden {D}, intermediate {F}, 32 heads) and the default model's vocabulary (49152), with "
        f"{' and '.join(str(b) for b in sorted({r['blocks'] for r in rows}))} blocks; `awp-jax compress --stream --sparsity 0.5`, calibration 8 x 512 "
        "tokens, sequential, no evaluation; each run in its own process, one after another.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; float32 1024x1024 matmul measured at the start of "
        "each session of rows (the column before last; the last: the commit whose code the row ran). Rows are kept in scale_runs.json and skipped when the script runs again.",
        "",
        "## Peak resident memory",
        "",
        f"One block in float32: {block:.0f} MB. Its C matrices: {stats:.0f} MB. Calibration hidden states (inputs and "
        f"outputs): {acts:.0f} MB. Embedding in float32: {outer:.0f} MB. The process before loading any weight "
        f"(interpreter, jax, tokenizer, tokenized calibration text): {base:.0f} MB.",
        "",
        f"Bound: baseline + embedding + 2 x block + C + activations = **{bound:.0f} MB**.",
        "",
        "Rows marked \"in forward\" under solve were measured before the script timed the solves on a mesh: their forward column includes them.",
        "",
        "| blocks | method | devices | windows per pass | peak MB | within bound | wall s | s / block | load | forward | solve | write | matmul GFLOP/s at its start | code at |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['blocks']} | {r['method']}{' (' + str(args.awp_iters) + ' iterations)' if r['method'] == 'awp' else ''} "
                     f"| {r.get('devices', 1)} | {r.get('batch_size', 8)} | {r['peak_mb']:.0f} | {'yes' if r['peak_mb'] <= bound else 'NO'} | {s:.0f} | {s / r['blocks']:.0f} | "
                     + " | ".join("in forward" if k == "solve" and r.get("mesh_solves_untimed") else f"{100 * r[k] / s:.0f} %"
                                  for k in ("load", "forward", "solve", "write")) + f" | {r['gflops']:.0f} | {r.get('commit', '?')} |")
    by = {}
    for r in rows:
        by.setdefault((r["method"], r.get("devices", 1), r.get("batch_size", 8), r.get("commit")), {})[r["blocks"]] = r
    lines += ["", "Peak growth with the number of blocks (same method, devices, windows per pass and code):", ""]
    for (m, dev, bs, _), d in by.items():
        ks = sorted(d)
        if len(ks) > 1:
            lines.append(f"- {m}, {dev} device{'s' if dev > 1 else ''}, {bs} windows per pass: {ks[0]} → {ks[-1]} blocks: {d[ks[-1]]['peak_mb'] - d[ks[0]]['peak_mb']:+.0f} MB "
                         f"(one block in float32 is {block:.0f} MB)")
    # rows an earlier version measured (set aside by hand with the commit they ran at)
    for before in previous:
        lines += ["", f"Before (commit {before['commit']}, {before['what']}), same command:", ""]
        lines += [f"- {r['blocks']} blocks, {r['method']}{' on ' + str(r['devices']) + ' devices' if r.get('devices', 1) > 1 else ''}"
                  f"{', ' + str(r['batch_size']) + ' windows per pass' if r.get('batch_size', 8) != 8 else ''}: "
                  f"peak {r['peak_mb']:.0f} MB, {r['seconds'] / r['blocks']:.0f} s / block" for r in before["rows"]]
    lines += ["", "`forward` is the rest of the run: the calibration forward and C accumulation, tokenizing, starting up. "
              "`load` reads a block from disk and builds it in the checkpoint's dtype, `write` the whole output "
              "(sharded safetensors, tensor by tensor)."]
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / "scale.md"
    kept = ""  # bench/scale_device.py's section
    if md.exists() and "## One block on a device" in md.read_text():
        kept = "\n## One block on a device" + md.read_text().split("## One block on a device", 1)[1]
    md.write_text("\n".join(lines) + "\n" + kept)
    store.write_text(json.dumps({"baseline_mb": base, "bound_mb": bound, "rows": rows, **({"previous": previous} if previous else {})}, indent=2))
    print("\n".join(lines))



if __name__ == "__main__":
    main()
