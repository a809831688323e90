"""Sizing on paper: memory per device and predicted AWP time for large Llama models.

    python bench/sizing.py      # writes bench/results/sizing.md

Per linear layer W [d_out, d_in]: W, Θ and the gradient (W − Θ)C in float32, C [d_in, d_in] in
float32. One PGD iteration costs one matmul, 2·d_out·d_in² FLOPs (the projection — row top-k by
31 bisection passes over |Z| — is O(31·d_out·d_in), under 1 % of that for d_in ≥ 4096). The
paper's pruning setting is 200 iterations per layer.

Placement (awp_jax.sharding): rows of W/Θ split over the "model" axis (M devices), layers over the
"stack" axis (S devices), C's rows split over "model" too (the default: a device holds
d_in²/M·4 bytes of C and, inside each product, one partial product of the solver's row chunk,
at most ``--chunk-mb`` = 64 MiB, and the partial products it receives, as large; per iteration it
sends about W's size: the all-to-all of the partial products, (M−1)/M of d_out·d_in·4 bytes, plus
the all-to-all of its rows, 1/M of that) or replicated there (``split_c=False``: d_in²·4 bytes, no traffic).
Sequential calibration hands over one block (7 layers) at a time, so one device holds one
layer's shard: (3·d_out·d_in/M)·4 bytes plus its C.
Mesh: 8×H100 = 1 (stack) × 8 (model); TPU v5e-256 = 8 (stack: the 7 layers of a block) × 32 (model).
The predicted time assumes the devices stay busy; with only 7 layers in flight, small row shards
on a 256-chip mesh will not reach 50 % of peak, so treat the TPU figure as a lower bound.

Device rates are ASSUMPTIONS from datasheets, not measurements (no TPU or GPU was available to
this project when the table was written): fp32-accurate matmul ("highest" precision) at 50 % of
peak — TPU v5e: 197 bf16 TFLOP/s peak, "highest" fp32 emulation costs ~6 bf16 passes → ~16
TFLOP/s effective per chip; H100 SXM: 67 fp32 TFLOP/s peak → ~33 TFLOP/s effective per GPU.
Calibration (forward passes) is not included.
"""

import math
import pathlib

CHUNK = 64 * 2**20  # the CLI's --chunk-mb default: a solve's row chunk, all layers of a stack together

MODELS = {
    # hidden, intermediate, layers, heads, kv heads
    "Llama-2-7B": (4096, 11008, 32, 32, 32),
    "Llama-2-70B": (8192, 28672, 80, 64, 8),
    "Llama-3-405B": (16384, 53248, 126, 128, 8),
}
DEVICES = {"TPU v5e-256": (256, 197e12 / 6 * 0.5, 32, 16), "8x H100": (8, 67e12 * 0.5, 8, 80)}
ITERS = 200


def layer_kinds(h, inter, n_layers, heads, kv):
    hd = h // heads
    return {"q/o": (h, h, 2 * n_layers), "k/v": (kv * hd, h, 2 * n_layers), "gate/up": (inter, h, 2 * n_layers),
            "down": (h, inter, n_layers)}


def main():
    lines = ["# Sizing on paper: AWP on large Llama models", "", "Command: `python bench/sizing.py`. " + __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), ""]
    for dev, (n_dev, rate, model_axis, hbm) in DEVICES.items():
        lines += [f"## {dev} ({n_dev} devices, {hbm} GiB each, assumed {rate / 1e12:.0f} TFLOP/s effective each; model axis {model_axis})", "",
                  "| model | layer kind | shape | layers | W+Θ+grad shard (GiB) | C whole (GiB) | C split: 1/M (GiB) | per device, C split (GiB) | per device, C replicated (GiB) | sent per device per iteration, C split (GiB) | GFLOP per iteration (all layers of the kind) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, spec in MODELS.items():
            total_flops = 0.0
            for kind, (d_out, d_in, count) in layer_kinds(*spec).items():
                wt = 3 * d_out * d_in / model_axis * 4
                cc = d_in * d_in * 4
                flops = 2 * d_out * d_in * d_in * count
                total_flops += flops
                cs = cc / model_axis
                partial = 2 * min(d_out * d_in * 4, CHUNK)  # a row chunk's partial product, and those it receives
                traffic = d_out * d_in * 4 * (model_axis - 1) / model_axis * (1 + 1 / model_axis)
                fits = lambda b: f"{b / 2**30:.2f}" + ("" if b / 2**30 < hbm else " (does not fit)")
                lines.append(f"| {name} | {kind} | {d_out}x{d_in} | {count} | {wt / 2**30:.2f} | {cc / 2**30:.2f} | {cs / 2**30:.2f} | "
                             f"{fits(wt + cs + partial)} | {fits(wt + cc)} | {traffic / 2**30:.2f} | {flops / 1e9:,.0f} |")
            secs = total_flops * ITERS / (n_dev * rate)
            lines.append(f"| **{name}** | all | | | | | | | | | **{total_flops / 1e12:,.1f} TFLOP per iteration; {ITERS} iterations ≈ {secs / 60:.1f} min** |")
        lines.append("")
    lines += ["For the widest inputs (down_proj: d_in = intermediate size) C dominates: 10.6 GiB for Llama-3-405B whole, within an "
              "H100's 80 GiB but close to a v5e chip's 16 GiB; split over the model axis (the default) a device holds 1/M of it "
              "and C never moves: each iteration sends about W's size per device instead (its time depends on the interconnect "
              "and is not predicted here). Replicated (`split_c=False`) there is no traffic.", ""]
    out = pathlib.Path(__file__).parent / "results" / "sizing.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
