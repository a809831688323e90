"""Recipes: named, complete settings for a compression run, as data.

A :class:`Recipe` names a method and, per kind of constraint (``prune``, ``nm``, ``quant``,
``joint``, ``nm_joint``), that method's options; it may also fix the constraint itself (a recipe
file that says ``sparsity: 0.6``). Four are built in, all for AWP:

| recipe | pruning and N:M | quantization and joint |
|---|---|---|
| ``paper`` | the paper's: Wanda start, η = 2/‖C‖_F, tol 1e-4, 200 iterations | the paper's: RTN start, η = 1.5/‖C‖_F, 10 iterations; joint from dense, 100 |
| ``fast`` (default) | Wanda start, momentum, η = 1/λmax, 5 iterations (N:M: 10), 10 damped CG refit iterations (δ = 0.1) | quantization: GPTQ's sweep on AWQ's grid (act-order, damping 0.1), then 10 iterations in AWQ's scaled coordinates and the grid refit, all on C + 0.1·mean(diag C)·I; joint: Wanda→AWQ start, 50 |
| ``best`` | SparseGPT start (layer-wise count), η = 1/λmax, 50 iterations, 50 damped CG refit iterations (δ = 0.1) | as ``fast`` |
| ``admm`` | ALPS's ADMM (:class:`awp_jax.solver.ADMM`; layer-wise count for unstructured), then 10 CG iterations on C damped by 0.01 | as ``fast`` |

Output formats that cannot store AWQ's per-layer column scales (compressed-tensors, GGUF) take the
``quant_no_column_scales`` / ``joint_no_column_scales`` entries instead where a recipe has them:
for ``fast`` and ``best``, the paper's RTN start for quantization and the Wanda start for joint
compression.

Why these (``bench/results/quality.md``, ``bench/results/recipes.md``, ``bench/results/frontier.md``):
``fast`` at 50 % has a lower perplexity than ``paper`` (and than its own earlier 50 iterations without
the refit, on held-out calibration text and on the evaluation text) at SparseGPT's whole-model time,
so it is the default; ``best`` is the variant that had the lowest perplexity in most columns of
quality.md's pruning and N:M tables (60–90 %, 2:4, 4:8); ``admm``, measured later, is lower still
at 50 %, 70 % and 2:4 (frontier.md), at about twice SparseGPT's time; for quantization and joint
compression the AWQ start had the lowest perplexity of every AWP variant in every column, and it is
also the cheaper of AWP's good choices there. The grid refit after it (least-squares group scales,
codes kept) lowered the held-out perplexity at INT3 g128 (31.35 → 29.32) and INT4 g128 (16.30 →
15.98) in one session (frontier.md), so quantization takes it; joint compression does not (not measured).
Starting quantization from GPTQ's sweep on AWQ's grid instead (``init="awq_gptq"``) lowered the held-out
perplexity further with the refit: INT3 g128 29.32 → 22.49, INT4 g128 15.98 → 15.39 (frontier.md,
sections 11–14), so quantization starts there.

A recipe also holds the run's :class:`Pipeline` settings per kind, the settings around the method
that change what every layer is fitted to: the ridge of C, the token cap, the error-correcting
targets, the blocks' sparsity allocation. Each is off unless a recipe sets it. ``fast``, ``best`` and ``admm`` set one, for quantization with AWQ's column scales:
``c_ridge: 0.1`` (every layer fits ``C + 0.1·mean(diag C)·I``). Against the same recipe without it
it lowered the perplexity on all four texts of bench/results/robustness.md (calibration's held-out
slice, the Wikipedia articles and two out-of-domain texts) at INT3 and INT4 g128; for pruning it
raised the held-out perplexity (2:4 +2.8 %, 70 % with ``admm`` +14.5 %), so pruning keeps the plain C.

A recipe file (JSON, or YAML) holds the same fields::

    name: my-recipe           # optional (default: the file name)
    method: awp               # optional (default awp)
    sparsity: 0.6             # optional constraint fields: sparsity, nm ("2:4"), bits, group_size, symmetric
    options:                  # one mapping for every kind, or one per kind (prune / nm / quant / joint / nm_joint)
      prune: {init: sparsegpt, max_iter: 50, step_rule: lambda_max, step_scale: 1.0, refit_iters: 50, refit_damping: 0.1}
      quant: {init: awq}
    pipeline:                 # likewise: c_ridge, token_cap, error_correction, allocation, owl_lambda, owl_m
      quant: {c_ridge: 0.1}

Unknown keys, options the method does not take and values out of range are errors naming them.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import pathlib
from typing import Any, Mapping

from awp_jax import allocation, calibration, methods, targets

__all__ = ["Pipeline", "Recipe", "RECIPES", "DEFAULT", "get_recipe", "load_recipe", "parse_nm"]

RECIPE_KINDS = ("prune", "nm", "quant", "joint", "nm_joint", "quant_no_column_scales", "joint_no_column_scales")
CONSTRAINT_KEYS = ("sparsity", "nm", "bits", "group_size", "symmetric")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline:
    """The settings of a run around its method: what each layer's problem is built from, the same
    for every method. Each is off by default; the CLI flag of the same name (``--c-ridge``, ...)
    overrides a recipe's value, and ``off`` turns it off.

    ``c_ridge``: every method fits ``C + δ·mean(diag C)·I`` (:func:`awp_jax.calibration.ridge`);
    ``token_cap``: each calibration token's share of C capped (:func:`awp_jax.calibration.token_weights`);
    ``error_correction``: QEP's alpha, each layer fit to the dense model's outputs (:mod:`awp_jax.targets`);
    ``allocation``: ``uniform`` or ``owl`` (the blocks' sparsities, :mod:`awp_jax.allocation`), with
    OWL's ``owl_lambda`` and ``owl_m`` (``None``: OWL's own defaults)."""

    c_ridge: float | None = None
    token_cap: float | None = None
    error_correction: float | None = None
    allocation: str = "uniform"
    owl_lambda: float | None = None
    owl_m: float | None = None

    def __post_init__(self):
        for name in ("c_ridge", "token_cap", "error_correction", "owl_lambda", "owl_m"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a number, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, float(v))  # a plain float in reports (JSON), whatever number was given
        calibration.check_ridge(self.c_ridge)
        calibration.check_token_cap(self.token_cap)
        self.correction()
        if self.allocation != "owl" and (self.owl_lambda is not None or self.owl_m is not None):
            raise ValueError("owl_lambda / owl_m (--owl-lambda, --owl-m) are settings of --allocation owl")
        self.layer_allocation()

    def correction(self) -> targets.ErrorCorrection | None:
        """The error-correcting targets' settings, or ``None`` (off)."""
        return None if self.error_correction is None else targets.ErrorCorrection(alpha=self.error_correction)

    def layer_allocation(self) -> allocation.Allocation:
        """How the sparsity is spread over the blocks."""
        owl = {k: v for k, v in (("lam", self.owl_lambda), ("m", self.owl_m)) if v is not None}
        return allocation.Allocation(self.allocation, **owl)

    def compress_kwargs(self) -> dict:
        """What :func:`awp_jax.compress.compress_model` takes of these settings, as its keyword
        arguments; the allocation is not among them (:func:`awp_jax.allocation.allocate` turns it
        into one constraint per block)."""
        return {"c_ridge": self.c_ridge, "token_cap": self.token_cap, "error_correction": self.correction()}

    def check(self, constraint: methods.Constraint) -> None:
        """Errors for settings that ``constraint`` cannot take."""
        if self.allocation != "uniform" and (not constraint.sparsity or constraint.nm is not None):
            raise ValueError(f"--allocation {self.allocation} spreads an unstructured --sparsity over the blocks; "
                             f"{constraint.describe()} has none")

    def changed(self) -> dict:
        """The settings that differ from the defaults (for messages)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(Pipeline))


def _per_kind(what: str, values: Mapping, where: str) -> dict:
    """``values`` (one mapping for every kind, or one per kind) as one mapping per kind."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: {what} must be a mapping")
    if values and not set(values) & set(RECIPE_KINDS):  # one mapping for every kind
        return {k: dict(values) for k in RECIPE_KINDS}
    if set(values) - set(RECIPE_KINDS):
        raise ValueError(f"{where}: {what} mixes kinds ({', '.join(RECIPE_KINDS)}) and setting names; "
                         "give either one mapping for every kind or one per kind")
    for kind, v in values.items():
        if not isinstance(v, Mapping):
            raise ValueError(f"{where}: {what} for {kind} must be a mapping, got {v!r}")
    return {k: dict(v) for k, v in values.items()}


def parse_nm(text) -> tuple[int, int]:
    """``"2:4"`` (or ``[2, 4]``) → ``(2, 4)``."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return int(text[0]), int(text[1])
    try:
        n, m = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"expected N:M such as 2:4, got {text!r}") from None
    return n, m


def kind_key(constraint: methods.Constraint) -> str:
    """The recipe key of ``constraint``: its kind, with N:M + quantization as ``nm_joint``."""
    return "nm_joint" if constraint.kind == "joint" and constraint.nm is not None else constraint.kind


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A method and its options per kind of constraint (kinds not listed: the method's defaults),
    the run's :class:`Pipeline` settings per kind (kinds not listed: all off), and optionally the
    constraint's fields."""

    name: str
    doc: str = ""
    method: str = "awp"
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    constraint: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pipeline: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        methods.get_method(self.method)
        bad = sorted(set(self.options) - set(RECIPE_KINDS))
        if bad:
            raise ValueError(f"recipe {self.name!r}: unknown kind(s) {', '.join(bad)} in options; kinds are {', '.join(RECIPE_KINDS)}")
        for kind, opts in self.options.items():
            try:
                methods.make_options(self.method, **opts)
            except (TypeError, ValueError) as e:
                raise ValueError(f"recipe {self.name!r}, options for {kind}: {e}") from None
        bad = sorted(set(self.constraint) - set(CONSTRAINT_KEYS))
        if bad:
            raise ValueError(f"recipe {self.name!r}: unknown constraint field(s) {', '.join(bad)}; fields are {', '.join(CONSTRAINT_KEYS)}")
        bad = sorted(set(self.pipeline) - set(RECIPE_KINDS))
        if bad:
            raise ValueError(f"recipe {self.name!r}: unknown kind(s) {', '.join(bad)} in pipeline; kinds are {', '.join(RECIPE_KINDS)}")
        for kind, values in self.pipeline.items():
            unknown = sorted(set(values) - set(PIPELINE_KEYS))
            if unknown:
                raise ValueError(f"recipe {self.name!r}, pipeline for {kind}: unknown setting(s) {', '.join(unknown)}; "
                                 f"settings are {', '.join(PIPELINE_KEYS)}")
            try:
                Pipeline(**values)
            except ValueError as e:
                raise ValueError(f"recipe {self.name!r}, pipeline for {kind}: {e}") from None

    def _key(self, entries: Mapping, constraint: methods.Constraint, column_scales: bool) -> str:
        key = kind_key(constraint)
        return f"{key}_no_column_scales" if not column_scales and f"{key}_no_column_scales" in entries else key

    def options_for(self, constraint: methods.Constraint, *, column_scales: bool = True, **overrides):
        """The method's options for ``constraint`` (its kind's entry, then ``overrides`` on top).
        ``column_scales=False``: the output cannot store per-layer column scales (compressed-tensors,
        GGUF), so a ``<kind>_no_column_scales`` entry, where the recipe has one, replaces the kind's."""
        values = {**self.options.get(self._key(self.options, constraint, column_scales), {}), **overrides}
        return methods.make_options(self.method, **values)

    def pipeline_for(self, constraint: methods.Constraint, *, column_scales: bool = True, **overrides) -> Pipeline:
        """The :class:`Pipeline` settings for ``constraint``: its kind's entry (chosen as
        :meth:`options_for` chooses), then ``overrides`` on top (``None``: that setting off)."""
        values = {**self.pipeline.get(self._key(self.pipeline, constraint, column_scales), {}), **overrides}
        pipe = Pipeline(**values)
        pipe.check(constraint)
        return pipe

    def to_dict(self) -> dict:
        return {"name": self.name, "doc": self.doc, "method": self.method, "constraint": dict(self.constraint),
                "options": {k: dict(v) for k, v in self.options.items()},
                "pipeline": {k: dict(v) for k, v in self.pipeline.items()}}


# 5 accelerated iterations from Wanda's mask, then 10 CG iterations on that mask (C damped by 0.1·mean diag):
# a lower held-out perplexity than 50 iterations without the refit, at SparseGPT's whole-model time
# (bench/results/frontier.md, compress_time_short.md)
_FAST_PRUNE = {"momentum": True, "step_rule": "lambda_max", "step_scale": 1.0, "max_iter": 5, "refit_iters": 10,
               "refit_damping": 0.1}
# 2:4 was measured with 10 iterations (held-out 47.12 against 49.99 for 50 iterations without the refit)
_FAST_NM = {**_FAST_PRUNE, "max_iter": 10}
_BEST_PRUNE = {"init": "sparsegpt", "step_rule": "lambda_max", "step_scale": 1.0, "max_iter": 50,
               "refit_iters": 50, "refit_damping": 0.1}
_AWQ_START = {"init": "awq"}
# quantization: the least-squares grid refit at the end (after the AWQ start: held-out INT3 g128 31.35 -> 29.32, INT4
# g128 16.30 -> 15.98), and GPTQ's sweep on AWQ's grid as the start (with the refit, against the AWQ start: held-out
# INT3 g128 29.32 -> 22.49, INT4 g128 15.98 -> 15.39; bench/results/frontier.md sections 11-14); joint compression
# keeps the AWQ start alone (neither measured there)
_AWQ_QUANT = {"init": "awq_gptq", "grid_refit": True}
# quantization fits C + 0.1·mean(diag C)·I: against the same recipe without it, lower on all four texts of
# bench/results/robustness.md at INT3 g128 (held-out -1.0 %, Wikipedia articles -3.1 %, Python reference prose -1.6 %,
# Python source -9.9 %) and at INT4 g128 (-0.6 / -1.7 / -1.8 / -3.9 %); the rule fixed there before the rows ran
# (both out-of-domain texts lower, held-out at most +1 %) failed for pruning (2:4 held-out +2.8 %, 70 % admm +14.5 %),
# which keeps the plain C. Not measured for the RTN start (no column scales) or joint compression: off there.
_QUANT_PIPELINE = {"quant": {"c_ridge": 0.1}, "quant_no_column_scales": {}}
# ALPS's settings: ADMM, the layer-wise mask (unstructured), 10 CG iterations on C damped by 0.01
_ADMM_PRUNE = {"algorithm": "admm", "scope": "layer", "refit_iters": 10, "refit_damping": 0.01}
_ADMM_NM = {"algorithm": "admm", "refit_iters": 10, "refit_damping": 0.01}
# formats that cannot store AWQ's per-layer column scales: the paper's RTN start for quantization
# (bench/results/gguf.md has it ahead of GPTQ and of AWP from GPTQ's result on the Q4_0 grid); for joint
# compression the Wanda start (bench/results/quality.md, table 4: 80.71 against the paper's 97.90 at
# 50 % + INT4 g128; only the AWQ start was lower)
_NO_SCALES = {"quant_no_column_scales": {"init": "rtn"}, "joint_no_column_scales": {"init": "wanda"}}

RECIPES: dict[str, Recipe] = {
    "paper": Recipe(name="paper", doc="the AWP paper's settings (for reproduction; the slowest)"),
    "fast": Recipe(name="fast", doc="Wanda start + momentum, η = 1/λmax, 5 iterations + damped CG refit (pruning, N:M); AWQ + GPTQ start + grid refit on C with a ridge of 0.1 (quantization); AWQ start (joint)",
                   options={"prune": _FAST_PRUNE, "nm": _FAST_NM, "quant": _AWQ_QUANT, "joint": _AWQ_START, **_NO_SCALES},
                   pipeline=_QUANT_PIPELINE),
    "best": Recipe(name="best", doc="SparseGPT start + 50 iterations + damped CG refit (pruning, N:M); AWQ + GPTQ start + grid refit on C with a ridge of 0.1 (quantization); AWQ start (joint)",
                   options={"prune": _BEST_PRUNE, "nm": _BEST_PRUNE, "quant": _AWQ_QUANT, "joint": _AWQ_START, **_NO_SCALES},
                   pipeline=_QUANT_PIPELINE),
    "admm": Recipe(name="admm", doc="ALPS's ADMM solver, layer-wise mask, 10 damped CG iterations (pruning, N:M); AWQ + GPTQ start + grid refit on C with a ridge of 0.1 (quantization); AWQ start (joint)",
                   options={"prune": _ADMM_PRUNE, "nm": _ADMM_NM, "quant": _AWQ_QUANT, "joint": _AWQ_START, **_NO_SCALES},
                   pipeline=_QUANT_PIPELINE),
}
DEFAULT = "fast"


def load_recipe(path: os.PathLike) -> Recipe:
    """A recipe from a JSON or YAML file (see the module docstring for its fields)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe file {path} is not UTF-8 text: {e}") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"cannot parse recipe file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe file {path} must hold a mapping (name, method, options, ...), got {type(raw).__name__}")
    allowed = {"name", "doc", "method", "options", "pipeline", *CONSTRAINT_KEYS}
    bad = sorted(set(raw) - allowed)
    if bad:
        raise ValueError(f"recipe file {path}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
    method = raw.get("method", "awp")
    opts = _per_kind("options", raw.get("options") or {}, f"recipe file {path}")
    pipeline = _per_kind("pipeline", raw.get("pipeline") or {}, f"recipe file {path}")
    types = {f.name: f.metadata.get("type") for f in dataclasses.fields(methods.get_method(method).options)} if method in methods.METHODS else {}
    types.update({k: float for k in PIPELINE_KEYS if k != "allocation"})
    for kind_values in (*opts.values(), *pipeline.values()):  # YAML 1.1 reads 1e-4 as a string: convert with the setting's own type
        for k, v in list(kind_values.items()):
            if isinstance(v, str) and types.get(k) in (int, float):
                try:
                    kind_values[k] = types[k](v)
                except ValueError:
                    raise ValueError(f"recipe file {path}: {k} must be a number, got {v!r}") from None
    constraint = {k: raw[k] for k in CONSTRAINT_KEYS if k in raw}
    if "nm" in constraint and constraint["nm"] is not None:
        constraint["nm"] = parse_nm(constraint["nm"])
    try:
        return Recipe(name=str(raw.get("name", path.stem)), doc=str(raw.get("doc", "")), method=method, options=opts,
                      constraint=constraint, pipeline=pipeline)
    except ValueError as e:
        raise ValueError(f"recipe file {path}: {e}") from None


def get_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in recipe by name, or a recipe file."""
    if str(name_or_path) in RECIPES:
        return RECIPES[str(name_or_path)]
    p = pathlib.Path(name_or_path)
    if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
        return load_recipe(p)
    raise ValueError(f"unknown recipe {str(name_or_path)!r}: choose one of {', '.join(RECIPES)} or give a .json/.yaml recipe file")
