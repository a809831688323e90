"""The pipeline on a device mesh (8 fake CPU devices, in subprocesses: the device count is fixed
when jax starts): the calibration forward's statistics and the methods' sharded solves equal the
one-device ones, the compiled forward holds only the collectives its layout predicts, a whole
``awp-jax compress --mesh`` run gives the one-device model, and a mesh that does not fit the
devices is refused before any work."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import fake_devices_env, run_on_fake_devices

from awp_jax import assets, checkpoints
from awp_jax.export import save_hf_dir
from awp_jax.models import Llama, LlamaConfig, random_weights

def _run(script: str, timeout: int = 900) -> str:
    r = run_on_fake_devices(8, "-c", script, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout


FORWARD = r"""
import collections, re
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from awp_jax import calibration, sharding
from awp_jax.models import Llama, LlamaConfig, random_weights

assert jax.device_count() == 8
mesh = sharding.make_mesh(model=4, stack=2)
win = np.random.default_rng(0).integers(0, 101, (6, 32)).astype(np.int32)  # batches of 4 and 2 (both split over stack)
for kv in (4, 2):  # kv=2: a key/value head is split across two devices
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=kv,
                      head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
    m = Llama(cfg, random_weights(cfg, seed=5, scale=0.2))
    lay = sharding.ForwardLayout(mesh)
    for mode in ("parallel",):
        ref = calibration.block_statistics(m, win, batch_size=4, mode=mode)
        got = calibration.block_statistics(m, win, batch_size=4, mode=mode, layout=lay)
        for r, g in zip(ref, got):
            assert set(r) == set(g)
            for k in r:
                np.testing.assert_allclose(g[k], r[k], rtol=0, atol=2e-6 * np.abs(r[k]).max(), err_msg=f"kv={kv} {k}")
    assert not lay.replicated, lay.replicated
    # sequential with cross moments (error-correcting targets), 7 windows: the last batch of 3 is not
    # split over stack (its statistics' rows still are over model)
    win7 = np.random.default_rng(2).integers(0, 101, (7, 32)).astype(np.int32)
    runs = []
    for layout in (None, lay):
        got = []
        calibration.block_statistics(m, win7, batch_size=4, mode="sequential", cross=True, layout=layout,
                                     on_block=lambda li, st: got.append(st))
        runs.append(got)
    for r, g in zip(*runs, strict=True):
        assert set(r) == set(g) and any(k.endswith("#cross") for k in r)
        for k in r:
            np.testing.assert_allclose(g[k], r[k], rtol=0, atol=2e-6 * np.abs(r[k]).max(), err_msg=f"kv={kv} cross {k}")
    # the block's output (what the next block and the logits see) too
    blk = m.layers[0]
    x = m.embed(jnp.asarray(win[:4]))
    ctx = m.context(32)
    y_ref = calibration.run_block(blk, [x], ctx)[0]
    y = calibration.run_block(blk, [lay.batch(x)], lay.replicate(ctx), lay)[0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=5e-6 * float(np.abs(y_ref).max()))

# perplexity on the mesh, in memory and streamed from disk: batches of 4 split over stack (the last
# padded), and batches of 3, which the stack axis does not divide (replicated)
import tempfile, pathlib
from awp_jax import perplexity, streaming
from awp_jax.export import save_hf_dir

class Recording(sharding.ForwardLayout):  # what perplexity placed where
    batches, hiddens, states = [], [], []
    def batch(self, x):
        Recording.batches.append(super().batch(x)); return Recording.batches[-1]
    def hidden(self, x):
        Recording.hiddens.append(super().hidden(x)); return Recording.hiddens[-1]
    def block(self, state):
        Recording.states.append(super().block(state)); return Recording.states[-1]

def spec_of(state, name):
    return next(x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state) if name in jax.tree_util.keystr(p))

win = np.random.default_rng(1).integers(0, 101, (7, 32)).astype(np.int32)
d = pathlib.Path(tempfile.mkdtemp()) / "m"
save_hf_dir(m, d)
P = jax.sharding.PartitionSpec
for bs, split, kept in ((4, P("stack"), P("stack", "model")), (3, P(), P(None, "model"))):
    ref = perplexity.window_nll(m, win, batch_size=bs, progress=False)
    for model, n_states, streamed in ((m, 1, False), (streaming.open_model(d), cfg.num_layers, True)):
        Recording.batches.clear(); Recording.hiddens.clear(); Recording.states.clear()
        got = perplexity.window_nll(model, win, batch_size=bs, progress=False, layout=Recording(mesh))
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=f"batch {bs} {type(model).__name__}")
        assert [x.sharding.spec for x in Recording.batches] == [split] * -(-7 // bs), Recording.batches  # tokens
        # streamed: the hidden states between blocks also split by position over model
        assert [x.sharding.spec for x in Recording.hiddens] == [kept] * (-(-7 // bs) * streamed), Recording.hiddens
        assert len(Recording.states) == n_states and all(spec_of(s, "q_proj") == P("model") for s in Recording.states)

# ForwardLayout.gram directly: inputs split by feature or whole, a batch the stack axis does or does not
# divide, a feature count the model axis does not divide (the plain product), a cross moment
rng = np.random.default_rng(3)
for b_, d_, split in ((4, 64, True), (4, 64, False), (3, 64, True), (3, 64, False), (4, 30, True), (2, 96, True)):
    a_, c_ = (rng.standard_normal((b_, 8, d_)).astype(np.float32) for _ in range(2))
    ref = np.einsum("bli,blj->ij", a_.astype(np.float64), c_.astype(np.float64))
    spec = P(lay._batch_axis(b_), None, "model" if split and d_ % 4 == 0 else None)
    put = lambda v: jax.device_put(v, jax.sharding.NamedSharding(mesh, spec))
    got = jax.jit(lambda u, v: lay.gram(u, v, split=split))(put(a_), put(c_))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=f"{b_} {d_} {split}")
    if d_ % 4 == 0:
        assert got.sharding.spec == P("model", None) or got.sharding.spec == P("model"), got.sharding

# the parameters are laid out by the rules table
state = lay.block(nnx.state(m.layers[0]))
specs = {"/".join(str(getattr(k, "key", k)) for k in p[:-1]): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state)}
P = jax.sharding.PartitionSpec
assert specs["q_proj/weight"] == P("model") and specs["gate_proj/weight"] == P("model"), specs
assert specs["o_proj/weight"] == P(None, "model") and specs["down_proj/weight"] == P(None, "model"), specs
assert specs["input_layernorm/weight"] == P(), specs

# the compiled statistics pass (Megatron layout, kv heads whole per device), its input kept split by
# batch over stack and by position over model between blocks: exactly
#   1 all-gather of the block's input's positions [B/2, L/4, D -> L] within a model group,
#   2 all-reduces of the block's partial output [B/2, L, D] within a model group (after o_proj, down_proj),
#   2 collective-permutes (in loops) passing o_proj's and down_proj's input slices [B/2, L, d/4] around
#     a model group, for their statistics' rows (the inputs are never gathered whole),
#   1 all-reduce of the statistics' partial sums, every one row-split [d/4, d], across the stack (batch) axis,
# and no weight is ever gathered
cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4,
                  head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
m = Llama(cfg, random_weights(cfg, seed=5, scale=0.2))
lay = sharding.ForwardLayout(mesh)
stats_fn = calibration._block_fns(nnx.graphdef(m.layers[0]), None, lay)[0]
hlo = stats_fn.lower(lay.block(nnx.state(m.layers[0])), lay.hidden(jnp.zeros((4, 32, 64))), lay.replicate(m.context(32))).compile().as_text()
kinds_re = r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
ops = [l for l in hlo.splitlines() if re.search(r"= .*" + kinds_re + r"(-start)?\(", l)]
kinds = collections.Counter(re.search(kinds_re, l).group(1) for l in ops)
assert kinds == {"all-reduce": 3, "all-gather": 1, "collective-permute": 2}, (kinds, ops)
weights = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(m.layers[0]))}
def in_model_group(l):  # replica groups listed, or as the named axis of XLA's mesh notation (the one of size 4)
    named = re.search(r"mesh\[([^]]*)\] \{'(axis_[0-9])'\}", l)
    return "replica_groups={{0,1,2,3},{4,5,6,7}}" in l or bool(named and f"'{named.group(2)}'=4" in named.group(1))
for l in ops:
    result = re.search(r"= \(?(.*?)\)? " + kinds_re, l).group(1)
    shapes = [tuple(int(d) for d in s.split(",")) for s in re.findall(r"f32\[([0-9,]+)\]", result)]
    if "all-gather" in l:
        assert shapes == [(2, 32, 64)] and in_model_group(l), l  # the block's input, never a weight
    elif "collective-permute" in l:
        assert shapes in ([(2, 32, 16)], [(2, 32, 24)]), l  # a quarter of o_in's / down_in's features
        assert "{{0,3},{1,0},{2,1},{3,2},{4,7},{5,4},{6,5},{7,6}}" in l, l  # a ring within each model group
    elif len(shapes) == 1:
        assert shapes == [(2, 32, 64)] and in_model_group(l), l  # a row-parallel layer's partial output
    else:  # the four statistics, each split by rows over model, summed over the stack axis
        assert sorted(shapes) == [(16, 64)] * 3 + [(24, 96)] and "replica_groups={{0,4},{1,5},{2,6},{3,7}}" in l, l
    assert not any(s in weights for s in shapes if len(s) == 2 and s not in {(64, 64)}), l

# windows per forward pass: CPU devices share the host's memory, and every device of the model axis
# holds a pass's hidden states whole, so the default of 8 is divided by that axis (a multiple of stack, at least 2)
from awp_jax import execution
per_pass = {(mo, st): execution.choose(sharding.make_mesh(model=mo, stack=st)).windows_per_pass()
            for mo, st in ((8, 1), (4, 2), (2, 4), (1, 8))}
assert per_pass == {(8, 1): 2, (4, 2): 2, (2, 4): 4, (1, 8): 8}, per_pass  # at least 2 (execution.MIN_SHARED_WINDOWS)
assert execution.choose(None).windows_per_pass() == execution.WINDOWS_PER_PASS == 8
print("ok")
"""


def test_sharded_forward_statistics_and_collectives():
    assert _run(FORWARD).strip().endswith("ok")


SOLVES = r"""
import numpy as np, jax
from awp_jax import methods, sharding, execution
from awp_jax.cli import synthetic_layer

mesh = sharding.make_mesh(model=4, stack=2)
cases = [("sparsegpt", methods.Constraint(sparsity=0.5)), ("sparsegpt", methods.Constraint(nm=(2, 4))),
         ("gptq", methods.Constraint(bits=4, group_size=64)), ("gptq", None),
         ("awp", methods.Constraint(sparsity=0.5)), ("awp", methods.Constraint(bits=3, group_size=64))]
for d_out in (50, 64):  # 50 rows: padded to the 8 devices
    layers = [synthetic_layer(s, d_out, 256, 1024) for s in range(2)]
    ws, cs = np.stack([l[0] for l in layers]), np.stack([l[1] for l in layers])
    for name, con in cases:
        opts = None
        if con is None:  # GPTQ with act-order: the permutation comes from C, replicated
            con, opts = methods.Constraint(bits=3, group_size=64), methods.GPTQOptions(act_order=True)
        got = methods.compress_on_mesh(name, list(ws), list(cs), con, opts, mesh)
        for i in range(2):
            ref = methods.compress_layer(name, ws[i], cs[i], con, opts)
            a, b = np.asarray(got[i].theta), np.asarray(ref.theta)
            what = f"{name} {con.describe()} rows {d_out}"
            if name == "awp":  # row-sharded matmuls sum in another order
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=what)
                assert got[i].info.iterations == ref.info.iterations, what
            else:  # row-local sweeps: bit for bit
                assert np.array_equal(a, b), what
                assert got[i].info == ref.info, what
            if ref.q is None:
                assert np.array_equal(a == 0, b == 0), what
            elif name == "awp":  # a code at a rounding tie may go the other way
                assert np.mean(np.asarray(got[i].q.codes) != np.asarray(ref.q.codes)) < 1e-3, what
            else:
                assert np.array_equal(np.asarray(got[i].q.codes), np.asarray(ref.q.codes)), what
                assert np.array_equal(np.asarray(got[i].q.scale), np.asarray(ref.q.scale)), what

# methods and settings without a sharded form run on one device, and the executor says so
ex = execution.choose(mesh)
assert isinstance(ex, execution.OnMesh) and "2 (stack) x 4 (model)" in ex.name
assert ex.notes("wanda", methods.Constraint(sparsity=0.5), None)
assert ex.notes("awp", methods.Constraint(sparsity=0.5), methods.AWPOptions(init="sparsegpt", scope="layer"))
assert not ex.notes("awp", methods.Constraint(sparsity=0.5), None)
w, c = synthetic_layer(3, 64, 128, 512)
r = ex.solve("wanda", [w], [c], methods.Constraint(sparsity=0.5), methods.NoOptions())
assert np.array_equal(np.asarray(r[0].theta), np.asarray(methods.compress_layer("wanda", w, c, methods.Constraint(sparsity=0.5)).theta))

# --mesh parsing: what does not fit the 8 devices is named
assert sharding.parse_mesh("none") is None
assert dict(sharding.parse_mesh("auto").shape) == {"stack": 1, "model": 8}
assert dict(sharding.parse_mesh("model=2,stack=4").shape) == {"stack": 4, "model": 2}
assert dict(sharding.parse_mesh("stack=2").shape) == {"stack": 2, "model": 4}
for bad, words in [("model=3", "model=3 does not divide the 8 cpu devices"), ("model=3,stack=2", "6 devices, but there are 8"), ("model=2,stack=2", "4 devices, but there are 8"),
                   ("stack=3", "stack=3 does not divide the 8 cpu devices"), ("model=0", "at least 1"), ("model=x", "whole number"),
                   ("rows=8", "model=M,stack=S"), ("model=8,model=8", "model=M,stack=S")]:
    try:
        sharding.parse_mesh(bad)
    except ValueError as e:
        assert words in str(e), (bad, e)
    else:
        raise AssertionError(bad)
print("ok")
"""


def test_sharded_solves_equal_one_device_and_mesh_errors():
    assert _run(SOLVES).strip().endswith("ok")


SMALL = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=32, tie_word_embeddings=True, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    tok = checkpoints.load_tokenizer(assets.fetch(assets.DEFAULT_MODEL))
    save_hf_dir(Llama(SMALL, random_weights(SMALL, 4)), d / "model", tokenizer=tok)
    rng = np.random.default_rng(0)
    words = "the of and a in to is was for on as with by he at from his an were are which this".split()
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 400))}) for _ in range(20)))
    return d


@pytest.mark.parametrize("method", ["awp"])  # SparseGPT's sharded sweep: test_sharded_solves_equal_one_device_and_mesh_errors
def test_cli_run_on_a_mesh_gives_the_one_device_model(model_dir, tmp_path, method):
    from safetensors.numpy import load_file

    def compress(mesh, out):
        cmd = [sys.executable, "-m", "awp_jax.cli", "compress", "--model", str(model_dir / "model"), "--method", method,
               "--sparsity", "0.5", "--calib", str(model_dir / "text.jsonl"), "--nsamples", "4", "--seqlen", "64",
               "--eval-text", str(model_dir / "text.jsonl"), "--eval-seqlen", "32", "--eval-windows", "3",
               "--mesh", mesh, "--out", str(out)] + ([] if mesh != "none" else ["--batch-size", "2"])
        if method == "awp":
            # PGD alone: the default recipe's CG refit solves a linear system per row, which carries the
            # statistics' ~1e-7 differences times C's condition number into the weights (~1e-3 here); the
            # refit on a mesh is compared with one device solver-level (test_sharding.py) on identical C
            cmd += ["--max-iter", "30", "--refit-iters", "0"]
        r = run_on_fake_devices(8, *cmd[1:], timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        return r.stderr, load_file(str(out / "model.safetensors")), json.loads((out / "awp_report.json").read_text())

    log, mesh_w, report = compress("model=4,stack=2", tmp_path / "mesh")
    assert "on mesh 2 (stack) x 4 (model) of 8 cpu devices" in log and report["executor"].startswith("mesh 2 (stack) x 4")
    # the default windows per pass on CPU devices: 8 divided by the model axis (execution.OnMesh.windows_per_pass)
    assert report["calibration"]["windows_per_pass"] == 2
    _, one_w, one_report = compress("none", tmp_path / "one")
    assert one_report["executor"] == "one device"
    assert set(mesh_w) == set(one_w)
    for k in one_w:
        a, b = mesh_w[k], one_w[k]
        # the statistics differ in the order of their sums (~1e-7), so a weight at a tie may fall the other side
        assert np.mean((a == 0) != (b == 0)) < 1e-3, k
        close = (a != 0) & (b != 0)
        np.testing.assert_allclose(a[close], b[close], rtol=0, atol=1e-4 * np.abs(b).max(), err_msg=k)
    rel = {(r["block"], r["layer"]): r["rel_objective"] for r in one_report["layers"]}
    for r in report["layers"]:
        assert abs(r["rel_objective"] - rel[r["block"], r["layer"]]) <= 1e-3 * rel[r["block"], r["layer"]] + 1e-7, r
    # the evaluations ran on the mesh too: the dense model's perplexity is the one device's; the
    # compressed models differ by the weights at ties above
    assert report["perplexity"]["dense"] == pytest.approx(one_report["perplexity"]["dense"], rel=1e-5)
    assert report["perplexity"]["compressed"] == pytest.approx(one_report["perplexity"]["compressed"], rel=1e-3)


def test_cli_refuses_a_mesh_that_does_not_fit_before_any_work(model_dir, tmp_path):
    out = tmp_path / "x"
    r = subprocess.run([sys.executable, "-m", "awp_jax.cli", "compress", "--model", str(model_dir / "model"), "--mesh", "model=3",
                        "--out", str(out)], env=fake_devices_env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "model=3 does not divide the 8 cpu devices" in r.stderr, r.stderr[-2000:]
    assert not out.exists() and not (tmp_path / ".x.run").exists()
