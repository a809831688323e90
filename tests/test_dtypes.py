"""Outputs keep the input checkpoint's dtype: a bf16 model compressed is written as bf16, its
compressed form stores kept values in bf16, and transformers loads it with the package's logits."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from awp_jax import checkpoints, dtypes, packed
from awp_jax.cli import main
from awp_jax.export import save_hf_dir
from awp_jax.models import Llama, forward, random_weights, weights_of
from tests.test_pipeline import SMALL, _windows, small_dir  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def bf16_dir(small_dir, tmp_path_factory):
    """A small random Llama stored in bfloat16, with the default model's tokenizer."""
    d = tmp_path_factory.mktemp("bf16")
    cfg = dataclasses.replace(SMALL, storage_dtype="bfloat16")
    weights = {k: dtypes.round_to(v, "bfloat16") for k, v in random_weights(cfg, 21).items()}
    save_hf_dir(Llama(cfg, weights), d / "model", tokenizer=checkpoints.load_tokenizer(small_dir / "model"))
    return d


def _tensor_dtypes(path):
    with safe_open(str(path), framework="numpy") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_bf16_checkpoint_is_read_as_bf16_and_written_back_as_bf16(bf16_dir):
    assert _tensor_dtypes(bf16_dir / "model" / "model.safetensors") == {"BF16"}
    assert json.loads((bf16_dir / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    cfg, weights, _ = checkpoints.load_checkpoint(bf16_dir / "model", with_tokenizer=False)
    assert cfg.storage_dtype == "bfloat16"


def test_weights_a_dtype_cannot_hold_are_refused_not_rounded_silently(tmp_path):
    cfg = dataclasses.replace(SMALL, storage_dtype="bfloat16")
    model = Llama(cfg, random_weights(cfg, 2))  # float32 values, not bf16 ones
    with pytest.raises(ValueError, match="bfloat16 cannot store exactly"):
        save_hf_dir(model, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("what", [["--sparsity", "0.5", "--max-iter", "10"], ["--bits", "4", "--group-size", "64", "--recipe", "paper"]])
def test_bf16_in_bf16_out_that_transformers_loads_with_the_packages_logits(small_dir, bf16_dir, tmp_path, what):
    out = tmp_path / "out"
    assert main(["compress", "--model", str(bf16_dir / "model"), *what, "--calib", str(small_dir / "text.jsonl"),
                 "--nsamples", "4", "--seqlen", "64", "--eval-windows", "0", "--out", str(out)]) == 0
    assert _tensor_dtypes(out / "model.safetensors") == {"BF16"}
    report = json.loads((out / "awp_report.json").read_text())
    assert report["dtype"] == "bfloat16" and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the output is no bigger than the input; the compressed form is smaller
    sizes = report["sizes"]
    assert sizes["model.safetensors"] <= 1.01 * (bf16_dir / "model" / "model.safetensors").stat().st_size
    # rounding to bf16 changes each layer's objective only slightly (the report says by how much)
    for row in report["layers"]:
        assert abs(row["rel_objective"] - row["rel_objective_float32"]) <= 0.02 * row["rel_objective_float32"] + 1e-4
    # the compressed form decodes to the bf16 export bit for bit
    _, dense, _ = checkpoints.load_checkpoint(out, with_tokenizer=False)
    _, restored, _ = checkpoints.load_checkpoint(out / "compressed", with_tokenizer=False)
    assert all(np.array_equal(np.asarray(dense[k], np.float32), np.asarray(restored[k], np.float32)) for k in dense)
    model, _ = checkpoints.load_model(out, with_tokenizer=False)
    assert model.cfg.storage_dtype == "bfloat16"
    tokens = _windows(1, 40)
    ours = np.asarray(forward(model)(tokens))
    from transformers import AutoModelForCausalLM

    # float32 compute on the same (bf16-valued) weights: the port's parity tolerance
    tm = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tm(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.max(np.abs(ours - ref)) < 1e-3
    # transformers' own default for this config: bf16 weights and bf16 compute (8-bit mantissa):
    # logits within 3 % of their range
    tb = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert next(tb.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        refb = tb(torch.from_numpy(tokens).long()).logits.float().numpy()
    assert np.max(np.abs(ours - refb)) < 0.03 * np.ptp(ours)


def test_kept_values_are_stored_in_the_storage_dtype():
    rng = np.random.default_rng(0)
    theta = dtypes.round_to(rng.standard_normal((16, 64)) * (rng.random((16, 64)) < 0.5), "bfloat16")
    enc = packed.encode(theta, pruned=True, dtype="bfloat16")
    assert enc["values"].dtype == dtypes.np_dtype("bfloat16")
    assert packed.stored_bits(enc) <= theta.size + 16 * np.count_nonzero(theta)
    assert np.array_equal(packed.decode(enc), theta)
    # float32 values are encoded as their bf16 rounding, and that is what decode gives
    raw = rng.standard_normal((16, 64)).astype(np.float32)
    assert np.array_equal(packed.decode(packed.encode(raw, dtype="bfloat16")), dtypes.round_to(raw, "bfloat16"))


def test_dtype_flag_rounds_a_float32_model_on_loading(small_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["compress", "--model", str(small_dir / "model"), "--dtype", "float16", "--method", "wanda",
                 "--calib", str(small_dir / "text.jsonl"), "--nsamples", "4", "--seqlen", "64", "--eval-windows", "0",
                 "--out", str(out)]) == 0
    assert _tensor_dtypes(out / "model.safetensors") == {"F16"}
    src, _ = checkpoints.load_model(small_dir / "model", with_tokenizer=False)
    got, _ = checkpoints.load_model(out, with_tokenizer=False)
    a, b = weights_of(src), weights_of(got)
    k = "model.layers.0.input_layernorm.weight"  # not compressed: only rounded
    assert np.array_equal(b[k], dtypes.round_to(a[k], "float16"))
    with pytest.raises(ValueError, match="do not fit in float16"):
        dtypes.round_to(np.array([1e6], np.float32), "float16")


def test_tensors_wider_than_the_linear_layers_are_rounded_by_auto_and_kept_by_default(bf16_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "mixed"
    shutil.copytree(bf16_dir / "model", d)
    tensors = load_file(str(d / "model.safetensors"))
    norm = "model.norm.weight"
    tensors[norm] = (1.0 + np.random.default_rng(0).standard_normal(tensors[norm].shape) / 7).astype(np.float32)  # not bf16 values
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    exact, _ = checkpoints.load_model(d, with_tokenizer=False)
    assert exact.cfg.storage_dtype == "float32" and np.array_equal(weights_of(exact)[norm], tensors[norm])
    auto, _ = checkpoints.load_model(d, storage_dtype="auto", with_tokenizer=False)
    assert auto.cfg.storage_dtype == "bfloat16" and np.array_equal(weights_of(auto)[norm], dtypes.round_to(tensors[norm], "bfloat16"))
    save_hf_dir(auto, tmp_path / "o")  # every tensor now holds bf16 values: written as bf16
    assert _tensor_dtypes(tmp_path / "o" / "model.safetensors") == {"BF16"}


def test_conversions_are_exact_in_steps_and_hold_little_beside_the_tensor():
    import tracemalloc

    rng = np.random.default_rng(3)
    n = 3 * dtypes._CHUNK + 12345  # several steps and a short last one
    x = rng.standard_normal(n).astype(np.float32).reshape(-1, 3)
    b = dtypes.round_to(x, "bfloat16")
    assert np.array_equal(b, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    tracemalloc.start()
    out = dtypes.cast_exact(b, "bfloat16", "w")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == x.shape and np.array_equal(out.astype(np.float32), b)
    # the output (half of x's bytes) and one step's temporaries, not 3.5 copies of the tensor at once
    assert peak < 0.5 * x.nbytes + 8 * 4 * dtypes._CHUNK, (peak, x.nbytes)
    bad = b.copy()
    bad.reshape(-1)[-1] = np.float32(1 + 2**-12)  # in the last step: no bfloat16 holds it
    with pytest.raises(ValueError, match="cannot store exactly"):
        dtypes.cast_exact(bad, "bfloat16", "w")
    big = b.copy()
    big.reshape(-1)[2 * dtypes._CHUNK] = 1e6
    with pytest.raises(ValueError, match="do not fit in float16"):
        dtypes.round_to(big, "float16")
