"""Bad input, numerical trouble and interrupted work (the table in docs/reliability.md)."""

import errno
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awp_jax import checkpoints, compress, data, methods
from awp_jax.cli import main, synthetic_layer
from awp_jax.models import Llama, random_weights, weights_of
from tests.test_pipeline import SMALL, SPECS, _windows


def _kinds(name):
    return [k for k in sorted(SPECS) if k in methods.METHODS[name].kinds]


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_dead_channels_and_all_zero_inputs_give_finite_results(name):
    w, c = synthetic_layer(3, 32, 128, 512)
    dead = np.arange(0, 128, 9)
    c[dead, :] = 0
    c[:, dead] = 0
    for kind in _kinds(name):
        for cc in (c, np.zeros_like(c)):
            theta = np.asarray(methods.compress_layer(name, w, cc, SPECS[kind]).theta)
            assert np.all(np.isfinite(theta)), (name, kind)


@pytest.mark.parametrize("corrupt, message", [
    (lambda w, c: (np.where(np.eye(*w.shape, dtype=bool), np.nan, w), c), "weights contain NaN or Inf"),
    (lambda w, c: (w, np.where(np.eye(*c.shape, dtype=bool), np.inf, c)), "C contain NaN or Inf"),
    (lambda w, c: (w, c - 2 * np.diag(np.diag(c))), "negative diagonal"),
    (lambda w, c: (w, c + np.triu(np.ones_like(c), 1)), "not symmetric"),
    (lambda w, c: (w, c + 100 * np.eye(*c.shape, k=-c.shape[0] + 1)), "not symmetric"),  # one entry, the last row's first
    (lambda w, c: (w, c[:-1, :-1]), r"C must be \[d_in, d_in\]"),
    (lambda w, c: (w[0], c), "2-D"),
])
def test_bad_layer_inputs_are_named_for_every_method(corrupt, message):
    w, c = synthetic_layer(4, 16, 64, 256)
    bw, bc = corrupt(w, c)
    for name in sorted(methods.METHODS):
        with pytest.raises(ValueError, match=message):
            methods.compress_layer(name, bw, bc, SPECS[_kinds(name)[0]])


def test_indefinite_c_in_sparsegpt_retries_damping_and_says_so(capsys):
    w, c = synthetic_layer(5, 32, 64, 256)
    lam, q = np.linalg.eigh(c.astype(np.float64))
    lam[:3] = -0.05 * lam.mean()  # three negative eigenvalues below the base damping; the diagonal stays positive
    bad = ((q * lam) @ q.T).astype(np.float32)
    bad = (bad + bad.T) / 2
    res = methods.compress_layer("sparsegpt", w, bad, methods.Constraint(sparsity=0.5))
    assert res.info.damping_retries >= 1 and np.all(np.isfinite(np.asarray(res.theta)))


def test_awp_nonfinite_update_stops_the_layer_with_a_reason():
    from awp_jax import solver

    w, c = synthetic_layer(6, 16, 64, 256)
    cfg = solver.awp_pruning(0.5, step_rule="absolute", step_scale=1e30, max_iter=50)
    res = solver.solve_pgd(w, c * 1e10, cfg)
    assert solver.StopReason(int(res.stop_reason)) == solver.StopReason.NONFINITE
    assert np.all(np.isfinite(np.asarray(res.theta)))


def test_full_disk_keeps_finished_blocks_and_names_the_problem(tmp_path, monkeypatch):
    import safetensors.numpy

    real = safetensors.numpy.save_file
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # block 1: the disk fills up half-way through the write
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", flaky)
    model = Llama(SMALL, random_weights(SMALL, 12))
    with pytest.raises(OSError, match="cannot save block 1 .*No space left on device.*run the same command again to resume"):
        compress.compress_model(model, _windows(), "wanda", methods.Constraint(sparsity=0.5), progress=False, run_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0000.safetensors", "run.json"]  # no partial file


def test_same_inputs_give_bit_identical_models_and_reports():
    outs = []
    for _ in range(2):
        model = Llama(SMALL, random_weights(SMALL, 13))
        rep = compress.compress_model(model, _windows(), "awp", methods.Constraint(sparsity=0.5), methods.AWPOptions(max_iter=20),
                                         progress=False)
        outs.append((weights_of(model), [{k: v for k, v in r.items() if k != "seconds"} for r in rep]))
    (a, ra), (b, rb) = outs
    assert all(np.array_equal(a[k], b[k]) for k in a) and ra == rb


def test_too_short_calibration_text_is_refused_before_any_work(tmp_path):
    tok = checkpoints.load_tokenizer(__import__("awp_jax").assets.fetch(__import__("awp_jax").assets.DEFAULT_MODEL))
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.calibration_windows(data.tokenize(tok, "a short text"), 4, 512, 0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError):
        data.calibration_windows(data.tokenize(tok, data.load_text(tmp_path / "empty.txt")), 4, 64, 0)


def test_corrupt_gguf_and_safetensors_are_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(checkpoints.CheckpointError, match="not a readable GGUF"):
        checkpoints.load_checkpoint(bad)
    from awp_jax.export import save_hf_dir

    d = save_hf_dir(Llama(SMALL, random_weights(SMALL, 14)), tmp_path / "hf")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(checkpoints.CheckpointError, match="truncated or corrupt"):
        checkpoints.load_checkpoint(d)


def test_checkpoint_shapes_that_disagree_with_the_config_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    from awp_jax.export import save_hf_dir

    d = save_hf_dir(Llama(SMALL, random_weights(SMALL, 15)), tmp_path / "hf")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj"):
        checkpoints.load_model(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load_checkpoint(d)


FLAGS = {
    "--method": st.sampled_from(["awp", "wanda", "rtn", "gptq", "hwpq", "nope", ""]),
    "--sparsity": st.sampled_from(["0.5", "0", "1", "-0.1", "1.5", "nan", "abc"]),
    "--nm": st.sampled_from(["2:4", "4:2", "0:4", "2-4", "a:b", "3:8"]),
    "--bits": st.sampled_from(["2", "4", "8", "1", "9", "x"]),
    "--group-size": st.sampled_from(["128", "row", "0", "-3", "64", "x"]),
    "--nsamples": st.sampled_from(["4", "0", "-1", "x"]),
    "--seqlen": st.sampled_from(["64", "1", "0", "x"]),
    "--max-iter": st.sampled_from(["10", "0", "-5", "x"]),
    "--tol": st.sampled_from(["1e-4", "-1", "x"]),
    "--step-rule": st.sampled_from(["frobenius", "bogus"]),
    "--init": st.sampled_from(["wanda", "sparsegpt", "bogus"]),
    "--mode": st.sampled_from(["sequential", "parallel", "bogus"]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.nothing(), max_size=5).flatmap(
    lambda d: st.fixed_dictionaries({k: FLAGS[k] for k in d})))
def test_cli_fuzz_never_crashes_without_a_clear_message(tmp_path_factory, capsys, flags):
    args = ["compress", "--model", "/nonexistent/model", "--out", str(tmp_path_factory.mktemp("fuzz") / "o")]
    for k, v in flags.items():
        args += [k, v]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "error:" in err and "Traceback" not in err


def test_asymmetry_of_c_is_found_in_every_block_of_rows():
    # check_layer compares C with its transpose 512 rows at a time (no [d, d] temporary); 700 rows: the
    # second block is clamped into range and overlaps the first
    d = 700
    w = np.ones((4, d), np.float32)
    methods.check_layer(w, np.eye(d, dtype=np.float32))
    for i, j in [(699, 0), (0, 699), (600, 650), (10, 20), (511, 512)]:
        c = np.eye(d, dtype=np.float32)
        c[i, j] += 1
        with pytest.raises(ValueError, match="not symmetric"):
            methods.check_layer(w, c)
