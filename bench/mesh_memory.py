"""Per-device memory of the calibration forward on a device mesh, from the compiled programs.

    python bench/mesh_memory.py                 # 8 fake CPU devices, --mesh auto (model=8); ~2 minutes
    python bench/mesh_memory.py --mesh model=4,stack=2 --batch 8
    python bench/mesh_memory.py --solves        # AWP's sharded solves instead, C split and replicated

One Llama-2-7B-shaped block (hidden 4096, intermediate 11008, 32 heads; constant weights held in
bfloat16, as a streamed bf16 checkpoint's) and a batch of ``--batch`` x 512 hidden states placed as
the pipeline places them (:class:`awp_jax.sharding.ForwardLayout`). Each of the block's jitted
passes (``stats``: output and statistics; ``grams``: statistics only, the sequential mode's first
pass; ``run``: output only, its second) is compiled for the mesh and its ``memory_analysis()``
printed: arguments, outputs and temporaries per device, in MiB. On a pod this is what one
accelerator needs for the forward; on fake CPU devices the host holds every device's share.

``--solves``: instead, AWP's sharded solve (the CLI's default recipe, 50 %) compiled for each of a
7B block's layer stacks as the pipeline hands them over (q/k/v, o, gate/up, down; row chunks of
``--chunk-mb``, the CLI's default 64 MiB), with C split by rows over ``"model"`` (the default) and
replicated there (``split_c=False``).

Nothing is run, only compiled: the figures are XLA's buffer assignment, not measured memory. XLA's
CPU scheduler is the command line's (:func:`awp_jax.memory.configure_xla`); rows compiled before
87989c2 had XLA's default one, which ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true``
brings back.
Results are appended to bench/results/mesh_memory.md with the commit they were compiled at.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import rowstore  # noqa: E402  (bench/, the script's own directory)

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
    ap.add_argument("--mesh", default="auto", help="as awp-jax compress --mesh (default auto)")
    ap.add_argument("--batch", type=int, default=8, help="windows of 512 tokens per pass (default 8, the CLI's --batch-size)")
    ap.add_argument("--solves", action="store_true", help="AWP's sharded solves instead of the forward passes")
    ap.add_argument("--chunk-mb", type=int, default=64, help="row chunks of the solves, as the CLI's --chunk-mb (default 64)")
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    from awp_jax import memory

    memory.configure_xla()  # XLA's scheduler as the command line sets it (an XLA_FLAGS setting of it stands)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from awp_jax import calibration, sharding
    from awp_jax.models import Llama, LlamaConfig

    H, F = 4096, 11008
    if args.solves:
        return solves(args, H, F)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=F, num_layers=1, num_heads=32, num_kv_heads=32,
                      head_dim=128, rope_theta=10000.0, max_position_embeddings=4096, param_dtype="bfloat16")
    weights = {k: np.full(s, 1.0 if k.endswith("norm.weight") else 0.01, np.float32) for k, s in Llama.shapes(cfg).items()}
    model = Llama(cfg, weights)
    del weights
    mesh = sharding.parse_mesh(args.mesh)
    if mesh is None:
        raise SystemExit(f"--mesh {args.mesh} on {jax.device_count()} device(s) is no mesh")
    lay = sharding.ForwardLayout(mesh)
    state = lay.block(nnx.state(model.layers[0]))
    x = jnp.zeros((args.batch, 512, H), jnp.float32)
    x = lay.hidden(x)
    ctx = lay.replicate(model.context(512))
    graphdef = nnx.graphdef(model.layers[0])
    fns = calibration._block_fns(graphdef, None, lay)
    commit = rowstore.code_commit()
    what = f"mesh {dict(mesh.shape)} of {mesh.devices.size} devices, batch {args.batch} x 512"
    rows = ["| commit | setting | pass | arguments | outputs | temporaries | total (MiB per device) |", "|---|---|---|---|---|---|---|"]
    for name, fn in zip(("stats", "grams", "run"), fns[:3]):
        ma = fn.lower(state, x, ctx).compile().memory_analysis()
        a, o, t = (getattr(ma, k) / 2**20 for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
        rows.append(f"| {commit} | {what} | {name} | {a:.0f} | {o:.0f} | {t:.0f} | {a + o + t:.0f} |")
        print(rows[-1], flush=True)
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        md = RESULTS / "mesh_memory.md"
        head = "" if md.exists() else ("# Per-device memory of the calibration forward on a mesh\n\n" + __doc__.split("\n\n", 2)[2].strip()
                                       + "\n\nCommand: `python bench/mesh_memory.py` (at the commit in the first column).\n")
        with md.open("a") as f:
            f.write(head + "\n" + "\n".join(rows) + "\n")


def solves(args, H, F):
    import jax
    import numpy as np

    from awp_jax import methods, recipes, sharding
    from awp_jax import solver as solver_lib

    mesh = sharding.parse_mesh(args.mesh)
    if mesh is None:
        raise SystemExit(f"--mesh {args.mesh} on {jax.device_count()} device(s) is no mesh")
    con = methods.Constraint(sparsity=0.5)
    cfg = methods.awp_config(con, recipes.get_recipe("fast").options_for(con))
    n_stack, n_model = mesh.shape["stack"], mesh.shape["model"]
    pl = sharding.placements(mesh)
    commit = rowstore.code_commit()
    what = f"mesh {dict(mesh.shape)} of {mesh.devices.size} devices, AWP `fast` 50 %, row chunks of {args.chunk_mb} MiB"
    rows = ["| commit | setting | layers (chunk) | C | arguments | outputs | temporaries | total (MiB per device) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, n, d_out, d_in in (("q/k/v", 3, H, H), ("o", 1, H, H), ("gate/up", 2, F, H), ("down", 1, H, F)):
        start, stop = solver_lib.chunks_for((n, d_out, d_in), args.chunk_mb * 2**20)[0]
        r = stop - start
        L, R = -(-n // n_stack) * n_stack, -(-r // n_model) * n_model
        for split in (True, False):
            w = jax.ShapeDtypeStruct((L, R, d_in), np.float32, sharding=pl.weights)
            c = jax.ShapeDtypeStruct((L, d_in, d_in), np.float32, sharding=pl.stats_split if split else pl.stats)
            ma = sharding.sharded_solver(cfg, mesh, split).lower(w, c).compile().memory_analysis()
            a, o, t = (getattr(ma, k) / 2**20 for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
            rows.append(f"| {commit} | {what} | {name} {n} x [{d_out}, {d_in}] ({r} rows) | {'split' if split else 'replicated'} "
                        f"| {a:.0f} | {o:.0f} | {t:.0f} | {a + o + t:.0f} |")
            print(rows[-1], flush=True)
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "mesh_memory.md").open("a") as f:
            f.write("\nAWP's sharded solves (`python bench/mesh_memory.py --solves`):\n\n" + "\n".join(rows) + "\n")



if __name__ == "__main__":
    main()
