"""The ``awp-jax`` command line.

``awp-jax demo`` solves a synthetic activation-aware layer problem (correlated activations with a
few outlier channels, as real LLM layer inputs have) with AWP and the baselines it starts from, and
prints the layer objective before and after.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

__all__ = ["main", "synthetic_layer"]


def synthetic_layer(seed: int, d_out: int, d_in: int, n_tokens: int, n_outliers: int = 4, outlier_scale: float = 20.0):
    """A random layer ``W`` and ``C = X Xᵀ / n`` from correlated activations with outlier channels."""
    rng = np.random.default_rng(seed)
    mix = np.eye(d_in) + 0.5 * rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    x = mix @ rng.standard_normal((d_in, n_tokens))
    x[rng.choice(d_in, n_outliers, replace=False)] *= outlier_scale
    c = (x @ x.T / n_tokens).astype(np.float32)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    return w, c


def _demo(args) -> int:
    import awp_jax as aj
    from awp_jax.projections import keep_count
    from awp_jax.saliency import wanda_score

    spec = aj.QuantSpec(bits=args.bits, group_size=args.group_size)
    configs = [
        ("awp (from wanda)", f"{args.sparsity:.0%} per row", aj.awp_pruning(args.sparsity, max_iter=args.max_iter)),
        ("awp (from rtn)", f"int{args.bits} g{args.group_size}", aj.awp_quantization(args.bits, args.group_size)),
    ]
    w, c = synthetic_layer(args.seed, args.d_out, args.d_in, args.tokens)
    spec.groups(args.d_in)
    dense = float(aj.objective(w, np.zeros_like(w), c))

    def rel(obj):
        return float(obj) / dense

    print(f"synthetic layer W [{args.d_out} x {args.d_in}], C from {args.tokens} tokens with outlier channels")
    print("relative layer objective  tr((W-Θ)C(W-Θ)ᵀ) / tr(W C Wᵀ)   (lower is better)\n")
    k = keep_count(args.sparsity, args.d_in)
    rows = [
        ("magnitude", f"{args.sparsity:.0%} per row", rel(aj.objective(w, aj.row_topk(w, k), c)), "-", 0.0),
        ("wanda", f"{args.sparsity:.0%} per row", rel(aj.objective(w, aj.project(w, k=k, score=wanda_score(w, c)), c)), "-", 0.0),
    ]
    rows.append(("rtn", f"int{args.bits} g{args.group_size}", rel(aj.objective(w, aj.rtn(w, spec), c)), "-", 0.0))
    for name, what, cfg in configs:
        t0 = time.perf_counter()
        res = aj.solve_pgd(w, c, cfg)
        obj = rel(res.obj_final)
        secs = time.perf_counter() - t0
        rows.append((name, what, obj, f"{int(res.iterations)} it, start {rel(res.obj_init):.4f}", secs))
    print(f"{'method':<18} {'constraint':<14} {'objective':>10}  {'solver':<26} {'seconds':>7}")
    for name, what, obj, note, secs in rows:
        print(f"{name:<18} {what:<14} {obj:>10.4f}  {note:<26} {secs:>7.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="awp-jax",
        description="Activation-aware pruning and quantization of linear layers by projected gradient descent.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="solve a synthetic activation-aware layer problem and print the objectives")
    demo.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row pruned (default 0.5)")
    demo.add_argument("--bits", type=int, default=3, help="quantization bits, 2..8 (default 3)")
    demo.add_argument("--group-size", type=int, default=128, help="quantization group size (default 128)")
    demo.add_argument("--d-out", type=int, default=512, help="layer output size (default 512)")
    demo.add_argument("--d-in", type=int, default=1024, help="layer input size (default 1024)")
    demo.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    demo.add_argument("--max-iter", type=int, default=200, help="AWP pruning iterations (default 200, the paper's)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
    except ValueError as e:  # bad settings: say which, no traceback
        parser.exit(2, f"awp-jax {args.command}: error: {e}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
