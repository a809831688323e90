"""Recipes and method options as data: every default in one place, foreign options refused."""

import dataclasses
import json

import pytest

from awp_jax import methods, recipes, solver


def test_builtin_recipes_give_the_documented_solver_settings():
    prune, nm, quant = methods.Constraint(sparsity=0.5), methods.Constraint(nm=(2, 4)), methods.Constraint(bits=4)
    joint, nm_joint = methods.Constraint(sparsity=0.5, bits=4), methods.Constraint(nm=(2, 4), bits=4)
    assert recipes.DEFAULT == "fast"
    # paper: the solver presets, untouched
    for con in (prune, nm, quant, joint, nm_joint):
        assert recipes.RECIPES["paper"].options_for(con) == methods.AWPOptions()
    cfg = methods.awp_config(prune, recipes.RECIPES["paper"].options_for(prune))
    assert (cfg.max_iter, cfg.step_rule, cfg.step_scale, cfg.tol, cfg.init, cfg.momentum) == (200, "frobenius", 2.0, 1e-4, "wanda", False)
    cfg = methods.awp_config(quant, methods.AWPOptions())
    assert (cfg.max_iter, cfg.step_scale, cfg.init) == (10, 1.5, "rtn")
    cfg = methods.awp_config(joint, methods.AWPOptions())
    assert [p.iters for p in cfg.schedule.phases] == [25, 25, 50] and cfg.init == "dense"
    # fast: momentum at 1/λmax for 5 iterations from Wanda, then 10 damped CG iterations; GPTQ on AWQ's grid as
    # quantization's start (then the grid refit), AWQ's for joint
    cfg = methods.awp_config(prune, recipes.RECIPES["fast"].options_for(prune))
    assert (cfg.max_iter, cfg.step_rule, cfg.step_scale, cfg.momentum, cfg.init) == (5, "lambda_max", 1.0, True, "wanda")
    assert (cfg.refit_iters, cfg.refit_damping, cfg.scope) == (10, 0.1, "row")
    cfg = methods.awp_config(nm, recipes.RECIPES["fast"].options_for(nm))
    assert (cfg.max_iter, cfg.refit_iters, cfg.refit_damping, cfg.init) == (10, 10, 0.1, "wanda")
    assert recipes.RECIPES["fast"].options_for(quant).init == "awq_gptq" and recipes.RECIPES["fast"].options_for(quant).grid_refit
    assert not recipes.RECIPES["fast"].options_for(joint).grid_refit  # the refit is measured for quantization only
    cfg = methods.awp_config(joint, recipes.RECIPES["fast"].options_for(joint))
    assert [p.iters for p in cfg.schedule.phases] == [50]  # joint iterations only, from Wanda→AWQ
    # N:M + quantization has no AWQ start: the recipes leave it at the paper's settings
    assert recipes.RECIPES["fast"].options_for(nm_joint) == methods.AWPOptions()
    methods.awp_config(nm_joint, recipes.RECIPES["best"].options_for(nm_joint))
    # best: SparseGPT start with the layer-wise count, a damped refit
    cfg = methods.awp_config(prune, recipes.RECIPES["best"].options_for(prune))
    assert (cfg.scope, cfg.refit_iters, cfg.refit_damping, cfg.max_iter) == ("layer", 50, 0.1, 50)
    assert recipes.RECIPES["best"].options_for(nm).init == "sparsegpt"
    # overrides go on top of the recipe
    assert recipes.RECIPES["best"].options_for(prune, max_iter=7).max_iter == 7
    # the ridge of C: quantization with AWQ's column scales only (bench/results/robustness.md), nothing else
    for name in ("fast", "best", "admm"):
        r = recipes.RECIPES[name]
        assert r.pipeline_for(quant) == recipes.Pipeline(c_ridge=0.1)
        assert r.pipeline_for(quant, column_scales=False) == recipes.Pipeline()  # the RTN start: not measured
        assert all(r.pipeline_for(con) == recipes.Pipeline() for con in (prune, nm, joint, nm_joint))
    assert all(recipes.RECIPES["paper"].pipeline_for(con) == recipes.Pipeline() for con in (prune, nm, quant, joint))
    json.dumps([r.to_dict() for r in recipes.RECIPES.values()])  # printable in the report


def test_options_a_method_does_not_take_are_errors():
    with pytest.raises(ValueError, match="method 'wanda' does not take max_iter; it takes: no options"):
        methods.make_options("wanda", max_iter=5)
    with pytest.raises(ValueError, match="method 'gptq' does not take momentum; it takes: blocksize, percdamp, act_order"):
        methods.make_options("gptq", momentum=True)
    with pytest.raises(ValueError, match="method 'gptq' takes GPTQOptions, got AWPOptions"):
        methods.resolve("gptq", methods.Constraint(bits=4), methods.AWPOptions())
    with pytest.raises(ValueError, match="step_rule must be one of"):
        methods.AWPOptions(step_rule="bogus")
    with pytest.raises(ValueError, match="percdamp must be a positive number"):
        methods.SparseGPTOptions(percdamp=0.0)
    with pytest.raises(ValueError, match="refit_iters is for pruning only"):
        methods.awp_config(methods.Constraint(bits=4), methods.AWPOptions(refit_iters=3))
    with pytest.raises(ValueError, match="scope is for unstructured pruning only"):
        methods.awp_config(methods.Constraint(nm=(2, 4)), methods.AWPOptions(scope="layer"))


def test_joint_max_iter_scales_the_schedule_instead_of_being_ignored():
    q = methods.Constraint(sparsity=0.5, bits=4)
    assert [p.iters for p in methods.awp_config(q, methods.AWPOptions(max_iter=40)).schedule.phases] == [10, 10, 20]
    assert [p.iters for p in methods.awp_config(q, methods.AWPOptions(max_iter=40, init="wanda")).schedule.phases] == [20, 20]
    assert methods.awp_config(methods.Constraint(nm=(2, 4), bits=4), methods.AWPOptions(max_iter=9)).max_iter == 9
    assert isinstance(solver.awp_nm_joint(2, 4, q.quant), solver.PGDConfig)


def test_settings_split_flat_fields_into_constraint_and_options():
    con, opt = methods.settings("awp", sparsity=0.6, max_iter=9, momentum=True)
    assert con == methods.Constraint(sparsity=0.6) and opt == methods.AWPOptions(max_iter=9, momentum=True)
    with pytest.raises(ValueError, match="does not take act_order"):
        methods.settings("sparsegpt", sparsity=0.5, act_order=True)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must hold a mapping"),
    ('{"method": "awp", "bogus": 1}', "unknown key"),
    ('{"method": "nope"}', "unknown method 'nope'"),
    ('{"options": {"prune": {"max_iter": 0}}}', "max_iter must be an integer >= 1"),
    ('{"options": {"prune": {}, "max_iter": 3}}', "mixes kinds"),
    ('{"options": {"quantise": {}}}', None),  # a flat mapping with a misspelt option: named below
    ("{not json", "cannot parse recipe file"),
])
def test_bad_recipe_files_are_named(tmp_path, content, message):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=message or "does not take quantise"):
        recipes.load_recipe(p)


def test_a_flat_recipe_applies_to_every_kind(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: flat\noptions: {max_iter: 12, momentum: true}\n")
    r = recipes.get_recipe(p)
    for con in (methods.Constraint(sparsity=0.5), methods.Constraint(bits=3)):
        assert dataclasses.asdict(r.options_for(con))["max_iter"] == 12
    with pytest.raises(ValueError, match="unknown recipe 'fastest'"):
        recipes.get_recipe("fastest")


def test_cli_flags_over_a_recipe(tmp_path):
    import argparse

    from awp_jax import cli

    def _resolve_run(ns):
        return cli._resolve_run(ns)[:4]

    path = tmp_path / "r.yaml"
    path.write_text("sparsity: 0.6\ngroup_size: 64\noptions: {prune: {momentum: true, tol: 1e-4}, nm: {momentum: true}}\n")
    _, _, con, opt = _resolve_run(argparse.Namespace(recipe=str(path), method=None))
    assert con == methods.Constraint(sparsity=0.6, group_size=64) and opt.momentum and opt.tol == 1e-4  # YAML's "1e-4" string
    # a target flag replaces the recipe's targets (sparsity, N:M, bits) instead of combining with them
    _, _, con, opt = _resolve_run(argparse.Namespace(recipe=str(path), method=None, nm=(2, 4)))
    assert con.nm == (2, 4) and con.sparsity == 0.0 and opt.momentum
    _, _, con, _ = _resolve_run(argparse.Namespace(recipe=str(path), method=None, bits=4))
    assert con.kind == "quant" and con.group_size == 64
    # a boolean flag can undo the recipe's
    _, _, _, opt = _resolve_run(argparse.Namespace(recipe="fast", method=None, momentum=False))
    assert not opt.momentum and opt.max_iter == 5
    with pytest.raises(ValueError, match="give --bits too"):
        _resolve_run(argparse.Namespace(recipe=None, method=None, symmetric=True))


def test_a_recipe_holds_pipeline_settings_per_kind_and_flags_override_them(tmp_path):
    """The settings around the method (ridge of C, token cap, error correction, allocation) live in
    a recipe per kind, as its options do; a flag overrides the recipe's value and 'off' turns it off."""
    import argparse

    from awp_jax import cli

    path = tmp_path / "r.yaml"
    path.write_text("pipeline:\n  quant: {c_ridge: 1e-1, token_cap: 20}\n  prune: {allocation: owl, owl_lambda: 0.1}\n")
    r = recipes.load_recipe(path)
    quant, prune = methods.Constraint(bits=4), methods.Constraint(sparsity=0.6)
    assert r.pipeline_for(quant) == recipes.Pipeline(c_ridge=0.1, token_cap=20.0)  # YAML's "1e-1" string read as a number
    assert r.pipeline_for(prune).layer_allocation().lam == 0.1 and r.pipeline_for(prune).c_ridge is None
    assert r.pipeline_for(methods.Constraint(nm=(2, 4))) == recipes.Pipeline()  # a kind not listed: all off
    assert r.to_dict()["pipeline"]["quant"] == {"c_ridge": 0.1, "token_cap": 20.0}

    def pipe(**flags):
        ns = argparse.Namespace(recipe=str(path), method=None, **{k: None for k in recipes.PIPELINE_KEYS})
        for k, v in flags.items():
            setattr(ns, k, v)
        return cli._resolve_run(ns)[4]

    assert pipe(bits=4) == recipes.Pipeline(c_ridge=0.1, token_cap=20.0)
    assert pipe(bits=4, c_ridge=0.3, token_cap="off") == recipes.Pipeline(c_ridge=0.3)
    assert pipe(sparsity=0.6, allocation="uniform") == recipes.Pipeline()  # OWL's settings go with its rule
    assert pipe(sparsity=0.6, error_correction=0.5).correction().alpha == 0.5
    with pytest.raises(ValueError, match="spreads an unstructured --sparsity"):
        pipe(nm=(2, 4), allocation="owl")
    # the default recipe quantizes on the ridged C; --c-ridge off turns it off, --c-ridge 0.3 replaces it
    default = argparse.Namespace(recipe=None, method=None, bits=4)
    assert cli._resolve_run(default)[4] == recipes.Pipeline(c_ridge=0.1)
    assert cli._resolve_run(argparse.Namespace(**vars(default), c_ridge="off"))[4] == recipes.Pipeline()
    assert cli._resolve_run(argparse.Namespace(**vars(default), c_ridge=0.3))[4].compress_kwargs() == {
        "c_ridge": 0.3, "token_cap": None, "error_correction": None}
    # one mapping for every kind
    path.write_text("pipeline: {c_ridge: 0.2}\n")
    assert all(recipes.load_recipe(path).pipeline_for(c).c_ridge == 0.2 for c in (quant, prune))


@pytest.mark.parametrize("pipeline, message", [
    ({"quant": {"c_rdge": 0.1}}, "unknown setting"),
    ({"quant": {"c_ridge": -1}}, r"c_ridge \(--c-ridge\) must be a finite number > 0"),
    ({"quant": {"c_ridge": "a lot"}}, "must be a number"),
    ({"prune": {"token_cap": 0.5}}, r"token_cap \(--token-cap\) must be a finite number >= 1"),
    ({"prune": {"error_correction": 2}}, r"alpha must be a number in \(0, 1\]"),
    ({"prune": {"owl_lambda": 0.1}}, "settings of --allocation owl"),
    ({"prune": {"allocation": "random"}}, "allocation rule must be"),
    ({"quantize": {"c_ridge": 0.1}}, "unknown kind"),
])
def test_bad_pipeline_settings_are_named(pipeline, message):
    with pytest.raises(ValueError, match=message):
        recipes.Recipe(name="r", pipeline=pipeline)
