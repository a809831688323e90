"""AWP's layer objective against SparseGPT and Wanda on real layers of the default model (50 %).

    python bench/real_layers.py

C from 16 x 512 calibration tokens (Wikipedia leads, seed 0), parallel mode (dense inputs).
Prints, per layer: κ(C), ||C||_F / λ_max(C) (how far the paper's step 2/||C||_F is from 2/λ_max),
and the relative layer objective tr((W−Θ)C(W−Θ)ᵀ)/tr(W C Wᵀ) of each method or solver setting.
"""

import jax.numpy as jnp
import numpy as np

import awp_jax as aj
from awp_jax import calibration, checkpoints, data, methods
from awp_jax.models import Llama

INPUT_OF = Llama.Block.LINEARS  # linear layer → the statistic its input gives
LINEAR_NAMES = tuple(INPUT_OF)

VARIANTS = [
    ("sparsegpt", "sparsegpt", {}),
    ("wanda", "wanda", {}),
    ("awp (paper)", "awp", {}),
    ("awp η=1/λmax", "awp", {"step_rule": "lambda_max", "step_scale": 1.0}),
    ("awp η=1.9/λmax", "awp", {"step_rule": "lambda_max", "step_scale": 1.9}),
    ("awp 1000 it", "awp", {"max_iter": 1000}),
    ("awp momentum", "awp", {"momentum": True}),
    ("awp momentum η=1/λmax", "awp", {"momentum": True, "step_rule": "lambda_max", "step_scale": 1.0}),
    ("awp momentum η=1/λmax 1000 it", "awp", {"momentum": True, "step_rule": "lambda_max", "step_scale": 1.0, "max_iter": 1000}),
]

model, tok = checkpoints.load_default()
windows = data.calibration_windows(data.tokenize(tok, data.calibration_text()), 16, 512, seed=0)
stats = calibration.block_statistics(model, windows, mode="parallel")
print("| layer | κ(C) | ‖C‖_F/λmax | " + " | ".join(v[0] for v in VARIANTS) + " |")
print("|---|---|---|" + "---|" * len(VARIANTS))
for b in (5, 20):
    for name in ("q_proj", "v_proj", "down_proj"):
        w = jnp.asarray(getattr(model.layers[b], name).weight[...])
        c = jnp.asarray(stats[b][INPUT_OF[name]])
        ev = np.linalg.eigvalsh(np.asarray(c, np.float64))
        dense = float(aj.objective(w, jnp.zeros_like(w), c))
        cells = []
        for _, method, kw in VARIANTS:
            res = methods.compress_layer(method, w, c, *methods.settings(method, sparsity=0.5, **kw))
            cells.append(f"{float(aj.objective(w, res.theta, c)) / dense:.4f}")
        print(f"| block {b} {name} | {ev[-1] / max(ev[0], 1e-12):.1e} | {np.linalg.norm(np.asarray(c)) / ev[-1]:.2f} | " + " | ".join(cells) + " |", flush=True)
