"""The lossless compressed form: encode/decode, bit packing, orbax checkpoints, --model ORBAX_DIR."""

import json

import numpy as np
import pytest
from conftest import run_on_fake_devices
from hypothesis import given, settings
from hypothesis import strategies as st

from awp_jax import checkpoints, compress, methods, packed
from awp_jax.cli import synthetic_layer
from awp_jax.export import save_hf_dir
from awp_jax.models import Llama, random_weights, weights_of
from tests.test_pipeline import SMALL, _windows


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_bit_packing_round_trips_and_uses_bits_per_value(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    p = packed.pack_bits(codes, bits)
    assert p.nbytes == -(-n * bits // 8)
    assert np.array_equal(packed.unpack_bits(p, bits, n), codes)


LAYER_SPECS = {
    "rtn int4": ("rtn", methods.Constraint(bits=4), None),
    "rtn int8 per row": ("rtn", methods.Constraint(bits=8, group_size=None), None),
    "gptq int3": ("gptq", methods.Constraint(bits=3), None),
    "gptq int4 act-order": ("gptq", methods.Constraint(bits=4), methods.GPTQOptions(act_order=True)),
    "awq int4": ("awq", methods.Constraint(bits=4), None),
    "awp int2 sym": ("awp", methods.Constraint(bits=2, symmetric=True), None),
    "awp 60%": ("awp", methods.Constraint(sparsity=0.6), methods.AWPOptions(max_iter=20)),
    "awp 75% int4": ("awp", methods.Constraint(sparsity=0.75, bits=4), methods.AWPOptions(max_iter=30)),
    "awp 2:4 int3": ("awp", methods.Constraint(nm=(2, 4), bits=3), methods.AWPOptions(max_iter=20)),
    "sparsegpt 2:4": ("sparsegpt", methods.Constraint(nm=(2, 4)), None),
}


@pytest.mark.parametrize("case", sorted(LAYER_SPECS))
def test_every_method_result_is_stored_losslessly_and_smaller(case):
    name, spec, opts = LAYER_SPECS[case]
    w, c = synthetic_layer(1, 96, 320, 2048)  # 320 = 2 full groups of 128 + a partial one
    res = methods.compress_layer(name, w, c, spec, opts)
    assert (res.q is not None) == bool(spec.bits)
    enc = packed.encode(res.theta, q=res.q, pruned=spec.prunes)
    theta = np.asarray(res.theta)
    assert np.array_equal(packed.decode(enc), theta)
    if spec.bits:  # the typed result is what was stored: codes < 2^bits, the method's own scales
        codes = packed.unpacked_codes(enc)
        assert codes.max() < 2**spec.bits
        assert np.array_equal(codes, np.asarray(res.q.codes)) and np.array_equal(enc["scale"], np.asarray(res.q.scale))
    dense_bits = 32 * theta.size
    if spec.bits:
        groups = -(-320 // (spec.group_size or 320))
        bound = spec.bits * theta.size + 40 * 96 * groups + 32 * 320  # codes + scale/zero + column extras
        if "mask" in enc:
            bound = theta.size + spec.bits * np.count_nonzero(theta) + 40 * 96 * groups + 16  # + byte padding
        assert packed.stored_bits(enc) <= bound
    else:
        assert packed.stored_bits(enc) <= theta.size + 32 * np.count_nonzero(theta) < dense_bits


def test_weights_that_are_not_the_typed_results_are_refused():
    from awp_jax.quantizers import QuantSpec, quantize

    w, _ = synthetic_layer(2, 8, 64, 128)
    q = quantize(w, QuantSpec(bits=4, group_size=32))
    with pytest.raises(packed.NotLosslessError, match="does not reproduce"):
        packed.encode(w, q=q)  # w is not q's dense matrix
    np.testing.assert_array_equal(packed.decode(packed.encode(q.dense(), q=q)), np.asarray(q.dense()))
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        packed.encode(w)


@pytest.mark.parametrize("method, spec, opts", [
    ("awp", methods.Constraint(sparsity=0.5, bits=4, group_size=64), methods.AWPOptions(max_iter=20)),
    ("awq", methods.Constraint(bits=3, group_size=64), None),
    ("sparsegpt", methods.Constraint(nm=(2, 4)), None),
])
def test_export_holds_an_orbax_checkpoint_that_decodes_to_the_dense_export(tmp_path, method, spec, opts):
    model = Llama(SMALL, random_weights(SMALL, 5))
    enc = {}
    compress.compress_model(model, _windows(), method, spec, opts, progress=False, encoded=enc)
    assert len(enc) == 14
    out = save_hf_dir(model, tmp_path / "out", encoded=enc)
    meta = json.loads((out / "compressed" / "awp_jax.json").read_text())
    assert set(meta["layers"]) == set(enc) and "model.embed_tokens.weight" in meta["params"]
    _, dense, _ = checkpoints.load_checkpoint(out, with_tokenizer=False)
    _, restored, _ = checkpoints.load_checkpoint(out / "compressed", with_tokenizer=False)
    assert set(dense) == set(restored)
    for k in dense:
        assert np.array_equal(dense[k], restored[k]), k
    layer_bytes = sum(packed.stored_bits(e) for e in enc.values()) / 8
    dense_bytes = sum(dense[k].nbytes for k in enc)
    assert layer_bytes < (0.45 if spec.bits else 0.6) * dense_bytes


def test_a_plain_flax_checkpoint_round_trips(tmp_path):
    model = Llama(SMALL, random_weights(SMALL, 7))
    checkpoints.save_orbax_model(model, tmp_path / "flax")
    again, _ = checkpoints.load_model(tmp_path / "flax", with_tokenizer=False)
    a, b = weights_of(model), weights_of(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        checkpoints.save_orbax_model(model, tmp_path / "flax")


@pytest.fixture(params=["in this process", "by a helper process"])
def writer_mode(request, monkeypatch):
    """The writer as one process uses it, and as process 0 of a jax.distributed run does (whose
    partial saves run in a helper process: :class:`awp_jax.packed._AloneSaver`)."""
    if request.param == "by a helper process":
        import jax

        monkeypatch.setattr(jax, "process_count", lambda: 2)
    return request.param


def test_the_orbax_writer_appends_parts_and_leaves_nothing_when_it_fails(tmp_path, writer_mode):
    r = np.random.default_rng(0)
    w = {f"model.layers.{i}.mlp.down_proj.weight": r.standard_normal((8, 32)).astype(np.float32) for i in range(3)}
    enc = {k: packed.encode(np.where(np.abs(v) > 0.5, v, 0), pruned=True) for k, v in w.items()}
    with packed.OrbaxWriter(tmp_path / "parts", {"x": 1}) as wr:
        for i, k in enumerate(w):  # one part per "block": a dense tensor and a compressed layer
            wr.add({f"n{i}": w[k][0]}, {k: enc[k]})
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["awp_jax.json", "state"]  # nothing of the writer's own
    meta, params, layers = packed.load_orbax(tmp_path / "parts")
    assert meta["config"] == {"x": 1} and meta["params"] == ["n0", "n1", "n2"] and set(layers) == set(w)
    assert all(np.array_equal(params[f"n{i}"], w[k][0]) for i, k in enumerate(w))
    assert all(np.array_equal(packed.decode(layers[k]), packed.decode(enc[k])) for k in w)

    with pytest.raises(ValueError, match="given twice.*n0"):
        with packed.OrbaxWriter(tmp_path / "twice", {}) as wr:
            wr.add({"n0": w[k][0]})
            wr.add({"n0": w[k][0]})
    with pytest.raises(FileExistsError):
        packed.OrbaxWriter(tmp_path / "parts", {})
    if writer_mode == "by a helper process":  # the helper dies between two parts: a clear error, nothing left
        with pytest.raises(RuntimeError, match="helper process writing the orbax checkpoint failed.*exited"):
            with packed.OrbaxWriter(tmp_path / "killed", {}) as wr:
                wr.add({"n0": w[k][0]})
                wr._alone.kill()
                wr.add({"n1": w[k][0]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # no partial directory left behind


def test_corrupt_orbax_checkpoint_is_a_clear_error(tmp_path):
    model = Llama(SMALL, random_weights(SMALL, 8))
    d = checkpoints.save_orbax_model(model, tmp_path / "m")
    victims = sorted(p for p in (d / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    assert victims
    for v in victims:
        v.write_bytes(v.read_bytes()[: v.stat().st_size // 3])
    with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
        checkpoints.load_checkpoint(d, with_tokenizer=False)
    (d / "awp_jax.json").write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
        checkpoints.load_checkpoint(d, with_tokenizer=False)


RESHARD = r"""
import os, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from awp_jax import packed
mesh = Mesh(np.array(jax.devices()), ("model",))
def place(name, shape):
    return NamedSharding(mesh, P("model") if len(shape) >= 1 and shape[0] % 4 == 0 else P())
meta, params, enc = packed.load_orbax(sys.argv[1], sharding=place)
emb = params["model.embed_tokens.weight"]
assert len(emb.sharding.device_set) == 4 and emb.addressable_shards[0].data.shape[0] == emb.shape[0] // 4
w = packed.dense_weights(params, enc)
ref = dict(np.load(sys.argv[2]))
assert set(ref) == set(w) and all(np.array_equal(ref[k], w[k]) for k in ref)
print("ok")
"""


def test_orbax_checkpoint_restores_onto_another_device_layout(tmp_path):
    model = Llama(SMALL, random_weights(SMALL, 9))
    enc = {}
    compress.compress_model(model, _windows(), "rtn", methods.Constraint(bits=4, group_size=64), progress=False, encoded=enc)
    d = checkpoints.save_orbax_model(model, tmp_path / "m", encoded=enc)
    np.savez(tmp_path / "ref.npz", **weights_of(model))
    r = run_on_fake_devices(4, "-c", RESHARD, str(d), str(tmp_path / "ref.npz"), timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
