"""awp_jax: activation-aware pruning and quantization of LLM linear layers by projected gradient descent."""

from awp_jax import projections, quantizers, saliency, schedules, solver
from awp_jax.projections import keep_count, nm_mask, nm_prune, project, row_topk, row_topk_mask
from awp_jax.quantizers import QArray, QuantSpec, dequantize, fake_quantize, quantize, rtn
from awp_jax.saliency import magnitude_score, wanda_score
from awp_jax.schedules import Phase, Schedule
from awp_jax.solver import (
    PGDConfig,
    PGDResult,
    StopReason,
    awp_joint,
    awp_nm,
    awp_pruning,
    awp_quantization,
    objective,
    pgd_path,
    refit_support,
    solve_pgd,
    solve_pgd_stack,
)

__version__ = "0.1.0"
