"""The ``awp-jax`` command line.

``awp-jax demo`` solves a synthetic activation-aware layer problem (correlated activations with a
few outlier channels, as real LLM layer inputs have) with AWP and the baselines it starts from, and
prints the layer objective before and after.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time

import numpy as np

from awp_jax import assets

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


def _nm(text: str) -> tuple[int, int]:
    from awp_jax.recipes import parse_nm

    try:
        return parse_nm(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _group(text: str) -> int | None:
    if text == "row":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'row', got {text!r}") from None


def _eval(args) -> int:
    from awp_jax import checkpoints, data, execution, perplexity, sharding

    layout = execution.choose(sharding.parse_mesh(args.mesh)).layout  # checked before any work
    tok = checkpoints.model_tokenizer(args.model)  # texts first: see _compress
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer files; evaluation needs one")
    windows = data.eval_windows(data.tokenize(tok, data.load_text(args.text)), args.seqlen, args.max_windows)
    model, _ = checkpoints.load_model(args.model, with_tokenizer=False)
    res = perplexity.perplexity(model, windows, batch_size=args.batch_size, layout=layout)
    print(f"perplexity {res.perplexity:.4f}  ({res.windows} windows x {res.seqlen} tokens, {res.tokens} predicted)")
    return 0


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matmul rate (GFLOP/s, best of ``repeats`` n×n products): printed next
    to every absolute time, since times mean little without it."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _option_fields() -> dict:
    """Every method option: field name → (dataclass field, the methods that take it)."""
    import dataclasses

    from awp_jax.methods import METHODS

    out: dict = {}
    for name, m in METHODS.items():
        for f in dataclasses.fields(m.options):
            out.setdefault(f.name, (f, []))[1].append(name)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option_flags(parser) -> None:
    """One flag per field of the methods' options dataclasses (``awp_jax.methods``), so the CLI
    never repeats a default: an unset flag is absent from the parsed namespace."""
    groups: dict = {}
    fields = _option_fields()
    for name, (f, owners) in sorted(fields.items(), key=lambda kv: "awp" not in kv[1][1]):  # awp's first
        key = ", ".join(owners)
        if key not in groups:
            note = " (a recipe sets some of them; a flag overrides the recipe)" if "awp" in owners else ""
            groups[key] = parser.add_argument_group(f"options of {key}{note}")
        md = f.metadata
        shown = ("the recipe's, else the paper's" if "awp" in owners else "the paper's") if f.default is None else f.default
        default = "" if "default" in md["help"] else f" (default: {shown})"
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": md["help"] + default}
        if f.default is False:
            kw["action"] = argparse.BooleanOptionalAction  # --momentum / --no-momentum: a flag can undo a recipe's
        else:
            kw["type"] = md.get("type", str)
            if "choices" in md:
                kw["choices"] = md["choices"]
        groups[key].add_argument(_flag(name), **kw)


def _check_writable(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless --overwrite) or whose folder cannot be written, before any work."""
    import tempfile

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; choose another or pass --overwrite")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OSError(e.errno, f"--out {out}: cannot write in {parent} ({e.strerror or e}); choose a writable location") from None


_OFF = "off"


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _number_or_off(text: str):
    """A pipeline flag's value: a number, or ``off`` (turns off what a recipe sets)."""
    if text.strip().lower() == _OFF:
        return _OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def _resolve_pipeline(args, recipe, constraint, column_scales: bool):
    """The run's :class:`awp_jax.recipes.Pipeline`: the recipe's for this kind, then the flags given."""
    from awp_jax import recipes

    given = {k: getattr(args, k, None) for k in recipes.PIPELINE_KEYS}
    overrides = {k: (None if v == _OFF else v) for k, v in given.items() if v is not None}
    if overrides.get("allocation") == "uniform":  # OWL's settings in the recipe go with its rule
        overrides = {"owl_lambda": None, "owl_m": None, **overrides}
    return recipe.pipeline_for(constraint, column_scales=column_scales, **overrides)


def _resolve_run(args):
    """``(recipe, method, constraint, options, pipeline)`` from the recipe and the flags; every mismatch is an error."""
    from awp_jax import methods, recipes

    recipe = recipes.get_recipe(args.recipe) if args.recipe is not None else None
    method = args.method or (recipe.method if recipe is not None else "awp")
    methods.get_method(method)
    if recipe is None:
        recipe = recipes.RECIPES[recipes.DEFAULT] if method == "awp" else recipes.Recipe(name="defaults", doc=f"{method}'s defaults", method=method)
    elif recipe.method != method:
        raise ValueError(f"--recipe {args.recipe} is a recipe for method {recipe.method}, not {method}; drop --method or choose "
                         f"another recipe (built-in recipes are for awp: {', '.join(recipes.RECIPES)})")
    given = {k: getattr(args, k) for k in ("sparsity", "nm", "bits", "group_size", "symmetric") if hasattr(args, k)}
    fields = dict(recipe.constraint)
    grid = _format_grid(args)
    if grid is not None:  # a block-quantized output type: its grid, and quantization unless pruning is asked too
        for k in ("group_size", "symmetric"):
            if k in given and given[k] != grid[k]:
                raise ValueError(f"--gguf-type {args.gguf_type} is {grid['bits']}-bit, group {grid['group_size']}, "
                                 f"{'symmetric' if grid['symmetric'] else 'asymmetric'}: {_flag(k)} {given[k]} does not fit it")
    if {"sparsity", "nm", "bits"} & set(given) or grid is not None:
        # the flags (or the block type) say what to compress to: none of the recipe's targets stays
        for k in ("sparsity", "nm", "bits"):
            fields.pop(k, None)
    fields.update(given)
    if grid is not None:  # quantized on the block type's grid, pruned too where asked
        fields.setdefault("bits", grid["bits"])
    if not any(fields.get(k) for k in ("sparsity", "nm", "bits")):
        fields["sparsity"] = 0.5
    if grid is not None and fields.get("bits") is not None:
        if fields["bits"] != grid["bits"]:
            raise ValueError(f"--gguf-type {args.gguf_type} is a {grid['bits']}-bit type; --bits {fields['bits']} does not fit it")
        fields.update(grid)
    if fields.get("bits") is None and {"group_size", "symmetric"} & set(given):
        raise ValueError("--group-size and --symmetric describe a quantization grid: give --bits too")
    constraint = methods.Constraint(**fields)
    fields_of = _option_fields()
    set_options = {k: getattr(args, k) for k in fields_of if hasattr(args, k)}
    takes = set(methods.option_names(method))
    foreign = [k for k in set_options if k not in takes]
    if foreign:
        k = foreign[0]
        flags = ", ".join(_flag(n) for n in sorted(takes)) or "no options"
        raise ValueError(f"{_flag(k)} is an option of {', '.join(fields_of[k][1])}; --method {method} takes: {flags}")
    from awp_jax import formats

    column_scales = formats.get_format(getattr(args, "format", "hf")).column_scales
    options = recipe.options_for(constraint, column_scales=column_scales, **set_options)
    methods.resolve(method, constraint, options)
    if method == "awp":
        methods.awp_config(constraint, options)  # option combinations the solver refuses, before any work
    return recipe, method, constraint, options, _resolve_pipeline(args, recipe, constraint, column_scales)


def _format_grid(args) -> dict | None:
    """The grid an output block type dictates (``--format gguf --gguf-type Q4_0``), or ``None``."""
    if getattr(args, "format", "hf") != "gguf" or args.gguf_type is None:
        return None
    from awp_jax.formats import gguf

    gguf._check_type(args.gguf_type)
    return gguf.GRIDS[args.gguf_type]


def _dir_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _compress(args) -> int:
    import dataclasses
    import platform

    import jax

    import awp_jax
    from awp_jax import checkpoints, compress, data, formats, interrupts, perplexity

    recipe, method, constraint, options, pipeline = _resolve_run(args)
    from awp_jax import allocation as allocation_lib

    alloc, correction = pipeline.layer_allocation(), pipeline.correction()
    if correction is not None and args.mode != "sequential":
        raise ValueError("--error-correction needs --mode sequential (the compressed model's inputs differ from the dense "
                         "model's only there)")
    fmt_options = {"gguf_type": args.gguf_type, "max_shard_size": args.max_shard_size}
    formats.get_format(args.format)
    if args.max_shard_size is not None:
        from awp_jax.formats.hf import parse_size

        parse_size(args.max_shard_size)
    if args.stream:
        formats.check_streams(args.format, True)
    if args.gguf_type is not None and args.format != "gguf":
        raise ValueError(f"--gguf-type is an option of --format gguf, not --format {args.format}")
    dtype = args.dtype
    if _format_grid(args) is not None and dtype == "auto":
        dtype = "float32"  # llama.cpp's blocks hold values only float32 holds exactly
    out = pathlib.Path(args.out)
    _check_writable(out, args.overwrite)

    rank = 0
    if args.num_processes > 1:
        if args.coordinator is None or args.process_id is None:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout)
        rank = jax.process_index()
    from awp_jax import execution, sharding

    # the mesh is checked against the devices before any work; with several processes each one's mesh
    # spans its own devices (the processes share the layers, execution.MultiProcess)
    mesh = sharding.parse_mesh(args.mesh, jax.local_devices() if args.num_processes > 1 else None)
    executor = execution.choose(mesh)
    if args.batch_size is None:
        args.batch_size = executor.windows_per_pass()
    t_start = time.perf_counter()
    # the texts are tokenized before the weights are loaded: tokenizing a million tokens briefly takes
    # ~0.7 GB, which should not add to the model's memory
    tok = checkpoints.model_tokenizer(args.model)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer files; calibration needs one")
    calib = data.calibration_windows(data.tokenize(tok, data.load_text(args.calib)), args.nsamples, args.seqlen, args.seed)
    eval_windows = None
    ppl = {}
    if args.eval_windows and rank == 0:
        eval_windows = data.eval_windows(data.tokenize(tok, data.load_text(args.eval_text)), args.eval_seqlen, args.eval_windows)
    if args.stream:
        from awp_jax import streaming

        # held as the in-memory load holds them: another --dtype (float32 for a llama.cpp block grid, whose values only
        # float32 holds exactly) rounds every tensor to it as it is read, a GGUF's dequantized from float32
        model = streaming.open_model(args.model, **({"gguf_dequantized_dtype": "float32", "storage_dtype": dtype}
                                                   if dtype != "auto" else {}))
    else:
        model, _ = checkpoints.load_model(args.model, storage_dtype=dtype, with_tokenizer=False)
    source = checkpoints.model_source(args.model)
    # what the output format can hold is settled before any calibration
    constraint = formats.constrain(args.format, constraint, method, options, model, source=source, **fmt_options)
    if eval_windows is not None:
        ppl["dense"] = perplexity.perplexity(model, eval_windows, batch_size=args.batch_size, layout=executor.layout).perplexity
        print(f"dense perplexity {ppl['dense']:.4f}", file=sys.stderr)
    opts = dataclasses.asdict(options)
    print(f"compressing with {method} ({constraint.describe()}; recipe {recipe.name}: {opts or 'no options'}"
          f"{'; ' + ', '.join(f'{k} {v}' for k, v in pipeline.changed().items()) if pipeline.changed() else ''}), "
          f"{args.mode} calibration on {args.nsamples} x {args.seqlen} tokens, weights in {model.cfg.storage_dtype}, "
          f"on {executor.name}", file=sys.stderr)
    # finished blocks are kept here until the output is written, so a killed run resumes
    run_dir = out.parent / f".{out.name}.run"
    weights_settings = {"model": str(args.model or "default"), "awp_jax_version": awp_jax.__version__}
    # streamed, the encoded layers stay in the run directory (read back one at a time by the writer)
    encoded: dict = {}
    block_sparsity = None
    if alloc.rule != "uniform":
        block_sparsity = allocation_lib.allocate(model, calib, constraint.sparsity, alloc, batch_size=args.batch_size,
                                                 progress=rank == 0, layout=executor.layout)
    layers = compress.compress_model(model, calib, method, constraint if block_sparsity is None else
                                     [dataclasses.replace(constraint, sparsity=s) for s in block_sparsity],
                                     options, mode=args.mode, batch_size=args.batch_size,
                                     progress=True, verbose=args.verbose, run_dir=run_dir, settings=weights_settings,
                                     encoded=encoded, executor=executor, **pipeline.compress_kwargs())
    if getattr(executor.layout, "replicated", None):
        print("note: kept whole on every device in the calibration forward (the model axis does not divide their split "
              "dimension): " + ", ".join(sorted(executor.layout.replicated)), file=sys.stderr)
    if rank != 0:  # process 0 evaluates and writes
        return 0
    if eval_windows is not None:
        ppl["compressed"] = perplexity.perplexity(model, eval_windows, batch_size=args.batch_size, layout=executor.layout).perplexity
    gflops = matmul_gflops()
    report = {
        "awp_jax_version": awp_jax.__version__, "jax_version": jax.__version__, "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()], "executor": executor.name, "matmul_gflops_float32": round(gflops, 1), "command": sys.argv,
        "model": str(args.model or "default"), "dtype": model.cfg.storage_dtype,
        "recipe": recipe.to_dict(), "method": method, "constraint": dataclasses.asdict(constraint), "options": opts,
        "calibration": {"text": str(args.calib), "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "mode": args.mode,
                        "windows_per_pass": args.batch_size,
                        "token_cap": pipeline.token_cap, "c_ridge": pipeline.c_ridge},
        "evaluation": {"text": str(args.eval_text), "seqlen": args.eval_seqlen, "windows": args.eval_windows},
        "pipeline": dataclasses.asdict(pipeline),
        "allocation": {**dataclasses.asdict(alloc), "block_sparsity": block_sparsity},
        "error_correction": None if correction is None else dataclasses.asdict(correction),
        "perplexity": ppl, "seconds": round(time.perf_counter() - t_start, 1), "layers": layers,
    }
    interrupts.check()  # not after a signal: the output is written only by a run that was not stopped
    formats.save(model, out, format=args.format, encoded=encoded, tokenizer=tok, source=source, report=report,
                 overwrite=args.overwrite, input_bytes=_dir_bytes(source), **fmt_options)
    shutil.rmtree(run_dir, ignore_errors=True)
    mean = {}
    for row in layers:
        mean.setdefault(row["layer"], []).append(row["rel_objective"])
    print("mean relative layer objective: " + ", ".join(f"{k} {np.mean(v):.4g}" for k, v in mean.items()))
    if ppl:
        print("perplexity: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items())
              + f"  ({len(eval_windows)} windows x {args.eval_seqlen} tokens of {args.eval_text} text)")
    sizes = formats.sizes(out)
    print("sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()) + f" (weights in {model.cfg.storage_dtype})")
    print(f"wrote {out} in {report['seconds']:.0f} s (this machine: float32 matmul {gflops:.0f} GFLOP/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    from awp_jax import memory

    memory.configure()
    memory.configure_xla()
    # transformers' advice that it found no torch: this package never needs torch models
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from awp_jax.dtypes import STORAGE_DTYPES
    from awp_jax.methods import METHODS
    from awp_jax.recipes import DEFAULT, RECIPES

    parser = argparse.ArgumentParser(
        prog="awp-jax",
        description="Activation-aware pruning and quantization of LLMs by projected gradient descent.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    comp = sub.add_parser(
        "compress", help="compress a model and write a Hugging Face directory",
        description="Calibrate, compress every linear layer, write the model. With no options: the default model "
        "(SmolLM2-135M), AWP with the 'fast' recipe at 50% sparsity, 32 x 512 calibration tokens of Wikipedia leads, "
        "perplexity on 32 x 512 tokens of Wikipedia articles before and after; the report (awp_report.json) gives "
        "the time next to this machine's measured matmul rate.",
    )
    comp.add_argument("--model", default=None, help="Hugging Face directory, .gguf file, orbax directory, or a named model fetched on first use: "
                      + ", ".join(assets.MODELS) + " (default: smollm2-135m, SmolLM2-135M-Instruct)")
    comp.add_argument("--recipe", default=None,
                      help="settings by name: " + ", ".join(f"{k} ({r.doc})" for k, r in RECIPES.items())
                      + f"; or a .json/.yaml recipe file (default: {DEFAULT} for awp, the method's defaults otherwise)")
    comp.add_argument("--method", default=None, help="one of: " + ", ".join(sorted(METHODS)) + " (default: the recipe's, awp)")
    comp.add_argument("--sparsity", type=float, default=argparse.SUPPRESS, help="fraction of each row pruned, in [0, 1) (default 0.5 when nothing else is asked)")
    comp.add_argument("--nm", type=_nm, default=argparse.SUPPRESS, help="N:M pattern along the input dimension, e.g. 2:4")
    comp.add_argument("--bits", type=int, default=argparse.SUPPRESS, help="quantize to this many bits (2..8)")
    comp.add_argument("--group-size", type=_group, default=argparse.SUPPRESS, help="quantization group size, or 'row' (default 128; a shorter last group where it does not divide)")
    comp.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help="symmetric grid (default: asymmetric with zero point)")
    comp.add_argument("--dtype", choices=("auto", *STORAGE_DTYPES), default="auto",
                      help="dtype of the weights and every output: auto = the checkpoint's own (a bf16 model stays bf16; "
                      "a GGUF's block-quantized tensors, which have none, become bfloat16); another value rounds the "
                      "model to it on loading (float32 keeps a GGUF's dequantized values exactly) (default auto)")
    comp.add_argument("--calib", default="calibration", help="calibration text: 'calibration' (Wikipedia leads) or a .txt/.jsonl file")
    comp.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    comp.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens (default 512)")
    comp.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    comp.add_argument("--mode", choices=("sequential", "parallel"), default="sequential", help="calibration mode (default sequential)")
    comp.add_argument("--eval-text", default="evaluation", help="evaluation text: 'evaluation' (Wikipedia articles) or a file")
    comp.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default 512)")
    comp.add_argument("--eval-windows", type=int, default=32, help="evaluation windows; 0 skips evaluation (default 32)")
    pipe = comp.add_argument_group("pipeline settings (each off unless the recipe sets it; a flag overrides the recipe, "
                                   "'off' turns it off)")
    pipe.add_argument("--allocation", choices=("uniform", "owl"), default=None,
                      help="how --sparsity is spread over the blocks: the same everywhere, or OWL's outlier rule "
                           "(blocks with more activation outliers keep more weights; the model's total is unchanged exactly) "
                           "(default: the recipe's, else uniform)")
    pipe.add_argument("--owl-lambda", type=_number_or_off, default=None, help="with --allocation owl: block sparsities span at most "
                      "twice this around --sparsity (default 0.08, OWL's)")
    pipe.add_argument("--owl-m", type=_number_or_off, default=None, help="with --allocation owl: an outlier is a Wanda score above "
                      "this many times its block's mean (default 5, OWL's)")
    pipe.add_argument("--error-correction", type=_number_or_off, default=None, metavar="ALPHA",
                      help="fit each layer, fed the compressed model's inputs, to the dense model's outputs, with this "
                           "fraction of the correction in (0, 1] (QEP's alpha; default: off). Works with every method")
    pipe.add_argument("--token-cap", type=_number_or_off, default=None, metavar="K",
                      help="cap each calibration token's share of the statistics C at K times the median squared norm "
                           "of that statistic's tokens in its batch of --batch-size windows (a window's first tokens can "
                           "carry most of C's trace); every method fits the capped C (the OWL allocation reads the "
                           "uncapped one). At least 1 (default: off)")
    pipe.add_argument("--c-ridge", type=_number_or_off, default=None, metavar="DELTA",
                      help="every method fits C + DELTA * mean(diag C) * I instead of each layer's C: pulls the fit from "
                           "the calibration activations toward the weights themselves (a regulariser against fitting the "
                           "calibration text too hard). Greater than 0 (default: the recipe's: 0.1 for quantization in fast, best and "
                           "admm, otherwise off)")
    comp.add_argument("--batch-size", type=_positive_int, default=None,
                      help="windows in one forward pass, calibration and evaluation (default 8; on a mesh of devices that "
                           "share one memory, e.g. CPU devices, 8 divided by the model axis, at least 2: each device of "
                           "that axis holds a pass's hidden states whole)")
    comp.add_argument("--num-processes", type=int, default=1, help="compress with this many processes (jax.distributed; default 1)")
    comp.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, with --num-processes > 1")
    comp.add_argument("--process-id", type=int, default=None, help="this process's index, with --num-processes > 1")
    comp.add_argument("--mesh", default="auto", help="device mesh for the calibration forward, the solves and the evaluations: model=M,stack=S "
                      "(M x S must equal the device count; rows of W and the model's tensor-parallel split over model, "
                      "layer stacks and calibration batches over stack), auto (every local device on model; one device: "
                      "none) or none (one device). With --num-processes, each process's mesh over its own devices "
                      "(the processes share the layers). Default auto")
    comp.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds before a silent process fails the run (default 100)")
    comp.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    comp.add_argument("--format", default="hf", choices=("hf", "orbax", "compressed-tensors", "gguf"),
                      help="output: hf (dense safetensors in the checkpoint's dtype + compressed/, lossless), orbax (the lossless "
                      "form alone), compressed-tensors (INT4/INT8 pack-quantized, for vLLM and transformers), gguf (llama.cpp; "
                      "needs --gguf-type and a .gguf source model) (default hf)")
    comp.add_argument("--gguf-type", default=None, help="with --format gguf: Q8_0, Q4_0, Q4_1 (the method optimises on that "
                      "block grid: group 32, float16 scales; no other flag needed) or F32, F16, BF16 (dense, for pruning)")
    comp.add_argument("--max-shard-size", default=None, help="with --format hf: largest safetensors shard, e.g. 5GB or "
                      "500MB; a larger model is written as shards with model.safetensors.index.json (default 50GB, as transformers)")
    comp.add_argument("--stream", action="store_true", help="keep one block in memory at a time: blocks are read from the "
                      "checkpoint when needed, compressed blocks kept on disk, the output written tensor by tensor (a Hugging "
                      "Face directory, orbax directory or GGUF file in, --format hf, compressed-tensors, gguf or orbax out; weights held in "
                      "--dtype, as in memory)")
    comp.add_argument("-v", "--verbose", action="store_true", help="one line per layer")
    _add_option_flags(comp)

    ev = sub.add_parser("eval", help="perplexity of a model on a text (WikiText protocol)")
    ev.add_argument("--model", default=None, help="Hugging Face directory, .gguf file, orbax directory such as OUT/compressed, or a named model: "
                    + ", ".join(assets.MODELS) + " (default: smollm2-135m)")
    ev.add_argument("--text", default="evaluation", help="'evaluation' (Wikipedia articles), 'calibration', or a .txt/.jsonl file")
    ev.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    ev.add_argument("--max-windows", type=int, default=None, help="use only the first N windows")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--mesh", default="auto", help="device mesh of the forward: model=M,stack=S (the model's tensor-parallel "
                    "split over model, batches over stack), auto or none, as for compress. Default auto")

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
    run = {"demo": _demo, "compress": _compress, "eval": _eval}[args.command]
    from awp_jax import interrupts

    try:
        with interrupts.handled():  # SIGINT and SIGTERM: a clean exit that says how to resume
            return run(args)
    except KeyboardInterrupt:
        where = ""
        if args.command == "compress":
            out = pathlib.Path(args.out)
            where = f"; finished blocks are kept in {out.parent / ('.' + out.name + '.run')}: run the same command again to resume"
        parser.exit(130, f"awp-jax {args.command}: interrupted{where}\n")
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError, ArithmeticError) as e:  # errors a user can act on
        parser.exit(2, f"awp-jax {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
