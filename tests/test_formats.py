"""Output formats (awp_jax.formats): compressed-tensors read by transformers and by the
compressed-tensors package itself; GGUF block types read by ``gguf`` bit for bit and loaded back
through ``--model``; what a format cannot hold is refused before any calibration."""

import json
import pathlib

import numpy as np
import pytest

from awp_jax import checkpoints, compress, dtypes, formats, methods, packed
from awp_jax.formats import FormatError
from awp_jax.formats import compressed_tensors as ct
from awp_jax.formats import gguf as gguf_format
from awp_jax.models import Llama, LlamaConfig, forward, random_weights, weights_of
from awp_jax.solver import objective
from tests.test_gguf_families import write_gguf

gguf = pytest.importorskip("gguf")

TINY = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=32, max_position_embeddings=256)


def _windows(n=8, L=64, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (n, L)).astype(np.int32)


def _compressed(method, constraint, options=None, *, fmt, dtype="float32", source=None, **fmt_opts):
    cfg = LlamaConfig(**{**TINY.__dict__, "storage_dtype": dtype})
    model = Llama(cfg, {k: dtypes.round_to(v, dtype) for k, v in random_weights(cfg, 3).items()})
    con = formats.constrain(fmt, constraint, method, options, model, source=source, **fmt_opts)
    enc = {}
    compress.compress_model(model, _windows(), method, con, options, progress=False, encoded=enc)
    return model, con, enc


# --------------------------------------------------------------------------- compressed-tensors

def test_int32_packing_is_the_compressed_tensors_packages_own():
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(0)
    for bits, n in ((4, 64), (8, 40), (3, 70), (4, 6)):
        codes = rng.integers(0, 2**bits, (5, n)).astype(np.uint8)
        theirs = helpers.pack_to_int32(torch.from_numpy((codes.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)).to(torch.int8), bits).numpy()
        np.testing.assert_array_equal(ct.pack_int32(codes, bits), theirs)
        np.testing.assert_array_equal(ct.unpack_int32(theirs, bits, n), codes)


@pytest.mark.parametrize("method, constraint", [
    ("awp", methods.Constraint(bits=4, group_size=64)),
    ("gptq", methods.Constraint(bits=8, group_size=None, symmetric=True)),
    ("awp", methods.Constraint(sparsity=0.5, bits=4, group_size=32, symmetric=True)),
])
def test_compressed_tensors_loads_in_transformers_with_the_packages_weights_and_logits(tmp_path, method, constraint):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    opts = methods.AWPOptions(max_iter=20) if method == "awp" and constraint.prunes else None
    model, con, enc = _compressed(method, constraint, opts, fmt="compressed-tensors", dtype="bfloat16")
    assert con.scale_dtype == "bfloat16"  # the grid was made with the scales the file stores
    out = formats.save(model, tmp_path / "ct", format="compressed-tensors", encoded=enc)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == con.bits
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    sd = hf.state_dict()
    ours = weights_of(model)
    for k, v in ours.items():  # every weight, the dequantized linear layers included, exactly
        np.testing.assert_array_equal(sd[k].float().numpy(), v, err_msg=k)
    tokens = _windows(2, 32, seed=5)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model)(tokens)), ref, atol=1e-4, rtol=0)
    # size: the packed layers against the same layers in bf16
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if ".layers." in k and "norm" not in k)
    bf16 = sum(ours[k].size * 2 for k in enc)
    print(f"{method} {con.describe()}: packed layers {stored} B vs {bf16} B in bf16 ({stored / bf16:.3f})")
    assert stored <= (0.30 if con.bits == 4 else 0.56) * bf16


def test_compressed_tensors_files_are_what_the_packages_compressor_writes_from_the_same_codes(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors import safe_open

    model, con, enc = _compressed("rtn", methods.Constraint(bits=4, group_size=64), fmt="compressed-tensors", dtype="bfloat16")
    out = formats.save(model, tmp_path / "ct", format="compressed-tensors", encoded=enc)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=False,
                                                                             strategy="group", group_size=64))
    w = weights_of(model)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name, e in enc.items():
            p = name[: -len("weight")]
            theirs = PackedQuantizationCompressor.compress({
                "weight": torch.from_numpy(w[name]).to(torch.bfloat16),
                "weight_scale": f.get_tensor(p + "weight_scale"),
                "weight_zero_point": torch.from_numpy((e["zero"].astype(np.int16) - 8).astype(np.int8)).to(torch.int8)}, scheme)
            for k in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"):
                assert torch.equal(theirs[k], f.get_tensor(p + k)), (name, k)


def test_compressed_tensors_refuses_what_it_cannot_hold_before_calibration():
    cfg = LlamaConfig(**{**TINY.__dict__, "hidden_size": 96, "head_dim": 24, "storage_dtype": "bfloat16"})
    model = Llama(cfg, random_weights(cfg, 1))
    cases = [
        (methods.Constraint(bits=4, group_size=64), "awp", None, "group 64 does not divide 96.*--group-size 32 or row"),
        (methods.Constraint(bits=3, group_size=32), "awp", None, "4 or 8-bit"),
        (methods.Constraint(sparsity=0.5), "wanda", None, "has no --bits"),
        (methods.Constraint(bits=4, group_size=32), "awq", None, "column scales"),
        (methods.Constraint(bits=4, group_size=32), "awp", methods.AWPOptions(init="awq"), "column scales"),
        (methods.Constraint(bits=4, group_size=32), "gptq", methods.GPTQOptions(grid="awq"), "--method gptq --grid awq keeps .*column scales"),
        (methods.Constraint(bits=4, group_size=32), "gptq", methods.GPTQOptions(act_order=True), "act-order"),
    ]
    for con, method, opts, msg in cases:
        with pytest.raises(FormatError, match=msg):
            formats.constrain("compressed-tensors", con, method, opts, model)
    with pytest.raises(FormatError, match="option of another output format"):
        formats.constrain("compressed-tensors", cases[0][0], "awp", None, model, gguf_type="Q4_0")


def test_linear_widths_come_from_the_shapes_and_a_streamed_model_reads_no_block_past_the_first(tmp_path, monkeypatch):
    """The format checks' input widths (every family, dense and mixtures: expert down_proj reads the
    expert width) equal those of the built layers; a streamed model builds block 0 only for them."""
    import dataclasses

    from transformers import Gemma3TextConfig, Phi3Config

    from awp_jax import models, streaming
    from awp_jax.export import save_hf_dir
    from tests.test_model import GEMMA3
    from tests.test_moe import MIXTRAL, QWEN3_MOE

    cfgs = [TINY, dataclasses.replace(TINY, model_type="qwen3"), models.config_from_hf(Gemma3TextConfig(**GEMMA3)),
            models.config_from_hf(Phi3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2)),
            MIXTRAL, QWEN3_MOE]
    for cfg in cfgs:
        model = models.build(cfg, random_weights(cfg, 2))
        built = sorted({int(blk.linear(n).weight.shape[-1]) for blk in model.layers for n in blk.LINEARS})
        assert formats.linear_widths(model) == built and len(built) > 1, cfg.family
    assert formats.linear_widths(models.build(QWEN3_MOE, random_weights(QWEN3_MOE, 2))) == [48, 64]

    cfg = dataclasses.replace(TINY, num_layers=3, storage_dtype="bfloat16")
    save_hf_dir(Llama(cfg, {k: dtypes.round_to(v, "bfloat16") for k, v in random_weights(cfg, 4).items()}), tmp_path / "m")
    model = streaming.open_model(tmp_path / "m")
    built = []
    real = streaming.StreamedModel._build
    monkeypatch.setattr(streaming.StreamedModel, "_build", lambda self, i: built.append(i) or real(self, i))
    assert formats.linear_widths(model) == [128, 256] and built == [0]


# --------------------------------------------------------------------------- GGUF

@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    write_gguf(path, "llama", TINY, random_weights(TINY, 3))
    return path


def _gguf_run(source, method, constraint, gguf_type, options=None):
    model, _ = checkpoints.load_model(source, with_tokenizer=False)
    con = formats.constrain("gguf", constraint, method, options, model, source=source, gguf_type=gguf_type)
    enc = {}
    compress.compress_model(model, _windows(), method, con, options, progress=False, encoded=enc)
    return model, con, enc


def test_llama_row_permutation_is_undone_by_the_loader():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    np.testing.assert_array_equal(checkpoints._unpermute(gguf_format._permute(w, 4), 4), w)


@pytest.mark.parametrize("gguf_type, method, constraint", [
    ("Q4_0", "awp", methods.Constraint(bits=4)),
    ("Q4_1", "rtn", methods.Constraint(bits=4)),
    ("Q8_0", "gptq", methods.Constraint(bits=8)),
    ("Q4_0", "awp", methods.Constraint(sparsity=0.5, bits=4)),
    ("F32", "wanda", methods.Constraint(sparsity=0.5)),
])
def test_gguf_blocks_read_back_bit_for_bit_and_load_with_the_same_perplexity(tmp_path, gguf_source, gguf_type, method, constraint):
    from awp_jax import perplexity

    opts = methods.AWPOptions(max_iter=20) if constraint.prunes and method == "awp" else None
    model, con, enc = _gguf_run(gguf_source, method, constraint, gguf_type, opts)
    out = formats.save(model, tmp_path / "g", format="gguf", encoded=enc, source=gguf_source, gguf_type=gguf_type)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type and types["blk.1.ffn_down.weight"] == gguf_type
    assert types["token_embd.weight"] == "F32"  # unchanged tensors as the source stored them
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[gguf_type]
    ours = weights_of(model)
    for t in reader.tensors:  # independently of the writer's own check: gguf's dequantization, llama's rows undone
        name = checkpoints._gguf_name(t.name, "llama")
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(ours[name].shape)
        if ".q_proj." in name or ".k_proj." in name:
            got = checkpoints._unpermute(got, TINY.num_heads if ".q_proj." in name else TINY.num_kv_heads)
        np.testing.assert_array_equal(got, ours[name], err_msg=t.name)
    if con.bits:  # ≤ 2^bits levels per block of 32, float16 scales
        q = packed.unpacked_codes(enc["model.layers.0.self_attn.q_proj.weight"])
        assert q.max() < 2**con.bits
        assert con.scale_dtype == "float16" and con.group_size == 32
    again, _ = checkpoints.load_model(out / "model.gguf", with_tokenizer=False)
    again_w = weights_of(again)
    assert all(np.array_equal(again_w[k], ours[k]) for k in ours)
    win = _windows(4, 64, seed=9)
    assert perplexity.perplexity(again, win).perplexity == perplexity.perplexity(model, win).perplexity


def test_a_loaded_gguf_model_keeps_no_parsed_reader(gguf_source):
    # a parsed GGUF holds its metadata as small arrays and the pages it read: 233 MB for the
    # default model's, which the run no longer needs once the weights are in the model
    import gc

    def readers():
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, gguf.GGUFReader)
                and pathlib.Path(str(getattr(o.data, "filename", ""))).resolve() == pathlib.Path(gguf_source).resolve()]

    checkpoints.gguf_reader(gguf_source)  # parsed once, as reading the tokenizer first leaves it
    assert readers()
    model, _ = checkpoints.load_model(gguf_source, with_tokenizer=False)
    assert not readers()
    assert checkpoints.gguf_reader(gguf_source).fields["general.architecture"].contents() == "llama"  # parsed again


def test_methods_optimise_on_the_q4_0_grid_itself(gguf_source):
    from awp_jax.cli import synthetic_layer

    model, _ = checkpoints.load_model(gguf_source, with_tokenizer=False)
    w, c = synthetic_layer(0, 128, 256, 4096)  # correlated activations with outlier channels
    con = formats.constrain("gguf", methods.Constraint(bits=4), "awp", None, model, source=gguf_source, gguf_type="Q4_0")
    rtn = methods.compress_layer("rtn", w, c, con)
    gptq = methods.compress_layer("gptq", w, c, con)
    awp = methods.compress_layer("awp", w, c, con)
    awp_gptq = methods.compress_layer("awp", w, c, con, methods.AWPOptions(init="gptq", step_rule="lambda_max", step_scale=1.0,
                                                                            max_iter=50))
    # the grid is llama.cpp's own (d = m / -8 for the weight m of largest magnitude): round to nearest on
    # it is llama-quantize's Q4_0 but for ties (half to even here, half up there)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
    assert np.mean(np.asarray(rtn.theta) == ref) > 0.999
    obj = {k: float(objective(w, r.theta, c)) for k, r in (("rtn", rtn), ("gptq", gptq), ("awp", awp), ("awp_gptq", awp_gptq))}
    assert obj["awp"] < obj["rtn"] and obj["awp_gptq"] < obj["gptq"] < 0.9 * obj["rtn"], obj
    # all on the Q4_0 grid: symmetric codes around 8, float16 scales, as the file stores them
    for r in (rtn, gptq, awp, awp_gptq):
        assert np.all(np.asarray(r.q.zero) == 8) and int(np.asarray(r.q.codes).max()) < 16
        s = np.asarray(r.q.scale)
        np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)


def test_gguf_refuses_what_it_cannot_hold_before_calibration(tmp_path, gguf_source):
    model, _ = checkpoints.load_model(gguf_source, with_tokenizer=False)
    con4 = methods.Constraint(bits=4)
    cases = [
        (dict(gguf_type=None), con4, "awp", "needs --gguf-type"),
        (dict(gguf_type="Q4_K"), con4, "awp", "K-quants"),
        (dict(gguf_type="Q4_0"), methods.Constraint(bits=3), "awp", "4-bit type; --bits 3"),
        (dict(gguf_type="Q4_1"), methods.Constraint(sparsity=0.5, bits=4), "awp", "Q4_1 has no zero code"),
        (dict(gguf_type="F16"), methods.Constraint(sparsity=0.5), "wanda", "only for a model in float16"),
        (dict(gguf_type="F32"), con4, "rtn", "dense: it cannot hold"),
        (dict(gguf_type="Q4_0"), con4, "awq", "column scales"),
    ]
    for opts, con, method, msg in cases:
        with pytest.raises(FormatError, match=msg):
            formats.constrain("gguf", con, method, None, model, source=gguf_source, **opts)
    with pytest.raises(FormatError, match="must be a .gguf file"):
        formats.constrain("gguf", con4, "awp", None, model, source=tmp_path, gguf_type="Q4_0")
    bf16, _ = checkpoints.load_model(gguf_source, storage_dtype="bfloat16", with_tokenizer=False)
    with pytest.raises(FormatError, match="--dtype float32"):
        formats.constrain("gguf", con4, "awp", None, bf16, source=gguf_source, gguf_type="Q4_0")


def test_a_failed_write_leaves_no_output_under_the_final_name(tmp_path, gguf_source):
    model, con, enc = _gguf_run(gguf_source, "rtn", methods.Constraint(bits=4), "Q4_0")
    enc = {k: {**v, "scale": v["scale"] * np.float32(1.0001)} for k, v in enc.items()}  # not float16 values
    with pytest.raises(FormatError, match="not a float16 value"):
        formats.save(model, tmp_path / "out", format="gguf", encoded=enc, source=gguf_source, gguf_type="Q4_0")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.fixture(scope="module")
def gguf_with_tokenizer(tmp_path_factory):
    from awp_jax import assets

    cfg = LlamaConfig(**{**TINY.__dict__, "vocab_size": 49152})
    path = tmp_path_factory.mktemp("srctok") / "tiny-tok.gguf"
    write_gguf(path, "llama", cfg, random_weights(cfg, 4), tokenizer_from=assets.fetch(assets.DEFAULT_MODEL))
    return path


@pytest.mark.parametrize("flags, written", [
    (["--format", "gguf", "--gguf-type", "Q4_0"], "model.gguf"),
    (["--format", "compressed-tensors", "--bits", "4", "--group-size", "64"], "model.safetensors"),
])
def test_the_cli_writes_each_format_with_the_recipes_start_for_it(tmp_path, gguf_with_tokenizer, flags, written):
    from awp_jax.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "out"
    args = ["compress", "--model", str(gguf_with_tokenizer), "--calib", str(text), "--nsamples", "4", "--seqlen", "64",
            "--eval-text", str(text), "--eval-windows", "2", "--eval-seqlen", "64", *flags]
    rc = main([*args, "--out", str(out)])
    assert rc == 0 and (out / written).is_file() and not (out / "compressed").exists()
    report = json.loads((out / "awp_report.json").read_text())
    # the default recipe (fast) starts quantization from AWQ, whose column scales neither format stores:
    # its no-column-scales entry (the RTN start) is used, and the report says so
    assert report["options"]["init"] == "rtn" and report["format"]["name"] == flags[1]
    assert report["sizes"][written] == (out / written).stat().st_size
    ppl = report["perplexity"]["compressed"]
    assert np.isfinite(ppl)
    if not written.endswith(".gguf"):  # read by transformers (tested above), not taken as an input model
        with pytest.raises(checkpoints.CheckpointError, match="holds quantized weights"):
            checkpoints.load_model(out, with_tokenizer=False)
    else:  # the file is what was evaluated
        from awp_jax import data, perplexity

        src, dst = gguf.GGUFReader(str(gguf_with_tokenizer)), gguf.GGUFReader(str(out / written))
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.context_length"):
            assert dst.fields[key].contents() == src.fields[key].contents(), key
        again, _ = checkpoints.load_model(out / written, with_tokenizer=False)
        tok = checkpoints.model_tokenizer(gguf_with_tokenizer)
        ev = data.eval_windows(data.tokenize(tok, data.load_text(text)), 64, 2)
        assert perplexity.perplexity(again, ev).perplexity == pytest.approx(ppl, rel=1e-6)
        # streamed (one block in memory, held in float32 for the block grid; the file written tensor by
        # tensor in two passes): the same file, byte for byte
        assert main([*args, "--out", str(tmp_path / "streamed"), "--stream"]) == 0
        assert (tmp_path / "streamed" / written).read_bytes() == (out / written).read_bytes()
    with pytest.raises(SystemExit):  # a format option of another format is refused by name
        main(["compress", "--model", str(gguf_with_tokenizer), "--calib", str(text), "--out", str(tmp_path / "x"),
              "--format", "hf", "--gguf-type", "Q4_0"])


def test_a_block_type_with_pruning_flags_is_joint_compression_with_the_joint_recipe(tmp_path, gguf_source):
    """--format gguf --gguf-type Q4_0 --sparsity 0.5 resolves, before any work, to 50 % + Q4_0 with the
    recipe's joint options (no column scales: the Wanda start), not pruning options."""
    import argparse

    from awp_jax import cli

    def resolve(*flags):
        ns = argparse.Namespace(recipe=None, method=None, format="gguf", gguf_type="Q4_0", **dict(flags))
        return cli._resolve_run(ns)[:4]

    _, method, con, opts = resolve(("sparsity", 0.5))
    assert con.kind == "joint" and con.bits == 4 and con.full_range and con.group_size == 32
    assert opts.init == "wanda"
    _, _, con, opts = resolve()
    assert con.kind == "quant" and opts.init == "rtn"
    with pytest.raises(ValueError, match="4-bit type; --bits 8"):
        resolve(("bits", 8))
