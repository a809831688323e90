"""Streaming (``--stream``): one block in memory at a time, the same model as the in-memory path,
sharded output that transformers loads, resumable, bad shards named."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from awp_jax import assets, checkpoints, compress, dtypes, methods, packed, streaming
from awp_jax.cli import main
from awp_jax.export import save_hf_dir
from awp_jax.models import Llama, LlamaConfig, random_weights


def _config(num_layers, hidden=128, inter=256, heads=4, kv=2):
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_layers=num_layers, num_heads=heads,
                       num_kv_heads=kv, head_dim=hidden // heads, tie_word_embeddings=True, max_position_embeddings=512,
                       storage_dtype="bfloat16")


def _write_model(path, cfg, seed=4, tokenizer=True):
    w = {k: dtypes.round_to(v, "bfloat16") for k, v in random_weights(cfg, seed).items()}
    tok = checkpoints.load_tokenizer(assets.fetch(assets.DEFAULT_MODEL)) if tokenizer else None
    save_hf_dir(Llama(cfg, w), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A 3-block bf16 model with the default model's tokenizer, and a text."""
    d = tmp_path_factory.mktemp("stream")
    _write_model(d / "model", _config(3))
    rng = np.random.default_rng(0)
    words = "the of and a in to is was for on as with by he at from his an were are which this".split()
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 400))}) for _ in range(30)))
    return d


def _cmd(d, out, *extra):
    text = str(d / "text.jsonl")
    return ["compress", "--model", str(d / "model"), "--method", "awp", "--sparsity", "0.5", "--max-iter", "10",
            "--calib", text, "--nsamples", "4", "--seqlen", "64", "--eval-text", text, "--eval-seqlen", "64",
            "--eval-windows", "4", "--out", str(out), *extra]


def test_streamed_run_equals_the_in_memory_run_and_its_shards_load_in_transformers(bf16_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    assert main(_cmd(bf16_dir, tmp_path / "mem")) == 0
    assert main(_cmd(bf16_dir, tmp_path / "stream", "--stream", "--max-shard-size", "400KB")) == 0
    a, b = checkpoints.load_hf_dir(tmp_path / "mem")[1], checkpoints.load_hf_dir(tmp_path / "stream")[1]
    assert set(a) == set(b)
    for k in a:  # same tensors, bit for bit, in the checkpoint's dtype
        assert a[k].dtype == b[k].dtype == dtypes.np_dtype("bfloat16") and np.array_equal(a[k], b[k]), k
    ra, rb = (json.loads((tmp_path / n / "awp_report.json").read_text()) for n in ("mem", "stream"))
    assert ra["perplexity"] == rb["perplexity"]
    assert [r["rel_objective"] for r in ra["layers"]] == [r["rel_objective"] for r in rb["layers"]]
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "stream").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards and set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in b.values())
    for s in shards[1:]:  # at most the shard size, except a tensor larger than it (the embedding)
        assert (tmp_path / "stream" / s).stat().st_size <= 400_000 + 4096

    tokens = np.random.default_rng(1).integers(0, 2000, (2, 32))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stream"), dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    model, _ = checkpoints.load_model(tmp_path / "stream", with_tokenizer=False)
    ours = np.asarray(model(tokens))
    assert np.max(np.abs(ours - theirs)) < 1e-3 * max(1.0, np.max(np.abs(theirs)))


def _assert_streamed_run_equals_in_memory(bf16_dir, model, tmp_path, held, *flags):
    """The CLI run of :func:`_cmd` on ``model`` with ``flags``, in memory and with ``--stream``: the
    same tensors, bit for bit and held in ``held``, and the same perplexity."""
    cmd = _cmd(bf16_dir, None, *flags)
    cmd[cmd.index("--model") + 1] = str(model)
    for name, extra in (("mem", []), ("stream", ["--stream"])):
        cmd[cmd.index("--out") + 1] = str(tmp_path / name)
        assert main(cmd + extra) == 0
    a, b = checkpoints.load_hf_dir(tmp_path / "mem")[1], checkpoints.load_hf_dir(tmp_path / "stream")[1]
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype == held and np.array_equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "awp_report.json").read_text()) for n in ("mem", "stream"))
    assert ra["perplexity"] == rb["perplexity"]


@pytest.mark.parametrize("linear_type", ["Q8_0", "F16"])
def test_a_gguf_streams_tensor_by_tensor_and_gives_the_in_memory_run(bf16_dir, tmp_path, linear_type):
    """A llama GGUF (q/k rows in llama.cpp's order) with Q8_0 or F16 linear layers beside F32 norms
    and embedding: its source gives each tensor's values one at a time, the streamed model holds
    every tensor as the in-memory load does (bfloat16 / float16, as --dtype auto), and (F16) a whole
    streamed run equals the in-memory one."""
    import gguf
    from test_gguf_families import write_gguf

    cfg = dataclasses.replace(_config(2), storage_dtype="float32")
    weights = random_weights(cfg, 4)
    gguf_path = tmp_path / "m.gguf"
    tok = assets.fetch(assets.DEFAULT_MODEL) if linear_type == "F16" else None  # the CLI run needs one
    write_gguf(gguf_path, "llama", cfg, weights, tokenizer_from=tok, linear_type=linear_type)
    got_cfg, source, _ = checkpoints.open_gguf(gguf_path)
    assert got_cfg.storage_dtype == {"Q8_0": "float32", "F16": "float16"}[linear_type] and set(source) == set(weights)
    q = gguf.GGMLQuantizationType[linear_type]
    for k, w in weights.items():  # the values written, through gguf's own quantizer for the linear layers
        want = gguf.quants.dequantize(gguf.quants.quantize(w, q), q) if k.endswith("_proj.weight") else w
        assert source.type_name(k) == (linear_type if k.endswith("_proj.weight") else "F32"), k
        assert source.spec(k)[0] == w.shape and np.array_equal(source.float32(k), want), k

    # the streamed model holds what the in-memory --dtype auto load holds, tensor by tensor
    from awp_jax.models import weights_of

    held = dtypes.np_dtype({"Q8_0": "bfloat16", "F16": "float16"}[linear_type])
    mem_w = weights_of(checkpoints.load_model(gguf_path, storage_dtype="auto", with_tokenizer=False)[0])
    streamed = streaming.open_model(gguf_path)
    for k in weights:
        t = streamed.tensor(k)
        assert t.dtype == held and np.array_equal(t.astype(np.float32), np.asarray(mem_w[k], np.float32)), k
    # another --dtype: dequantized to float32 and rounded to it, as the in-memory load of that dtype
    mem_w = weights_of(checkpoints.load_model(gguf_path, storage_dtype="float16", with_tokenizer=False)[0])
    streamed = streaming.open_model(gguf_path, gguf_dequantized_dtype="float32", storage_dtype="float16")
    for k in weights:
        t = streamed.tensor(k)
        assert t.dtype == np.float16 and np.array_equal(t, np.asarray(mem_w[k], np.float16)), k
    if linear_type == "Q8_0":
        return  # the whole-run comparison below (~50 s, most of it the GGUF tokenizer) runs on the F16 file
    _assert_streamed_run_equals_in_memory(bf16_dir, gguf_path, tmp_path, held)


def test_a_streamed_run_in_another_dtype_equals_the_in_memory_run(bf16_dir, tmp_path):
    """--stream --dtype float32 on a bf16 checkpoint: every tensor held and written in float32, as in memory."""
    _assert_streamed_run_equals_in_memory(bf16_dir, bf16_dir / "model", tmp_path, np.dtype(np.float32), "--dtype", "float32")


def test_norms_stored_wider_than_the_linear_layers_are_held_as_the_in_memory_run_holds_them(bf16_dir, tmp_path):
    """bf16 linear layers beside float32 norms that bf16 cannot hold: the streamed model evaluates
    and writes them rounded to bf16, as the in-memory --dtype auto holds them (so the model written
    is the model evaluated; the whole-run equality of the two paths: the tests above)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from awp_jax.models import weights_of

    d = tmp_path / "model"
    shutil.copytree(bf16_dir / "model", d)
    w = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(5)
    norms = [k for k in w if k.endswith("norm.weight")]
    for k in norms:
        w[k] = (1 + 0.01 * rng.standard_normal(w[k].shape)).astype(np.float32)
    save_file(w, str(d / "model.safetensors"))
    mem = weights_of(checkpoints.load_model(d, storage_dtype="auto", with_tokenizer=False)[0])
    streamed = streaming.open_model(d)
    bf16 = dtypes.np_dtype("bfloat16")
    for k in norms:
        written = streamed.tensor(k)
        assert written.dtype == bf16 and not np.array_equal(written.astype(np.float32), w[k]), k  # rounded
        assert np.array_equal(written.astype(np.float32), np.asarray(mem[k], np.float32)), k
    block = streamed.layers[1]  # what the forward computes with
    assert np.array_equal(np.asarray(block.input_layernorm.weight[...], np.float32),
                          streamed.tensor("model.layers.1.input_layernorm.weight").astype(np.float32))


def test_streamed_resume_after_failure_is_bit_identical(bf16_dir, tmp_path, monkeypatch):
    spec, opts = methods.Constraint(sparsity=0.5), methods.AWPOptions(max_iter=10)
    windows = np.random.default_rng(0).integers(0, 2000, (4, 64)).astype(np.int32)
    ref, _ = checkpoints.load_model(bf16_dir / "model", storage_dtype="auto", with_tokenizer=False)
    ref_enc = {}
    compress.compress_model(ref, windows, "awp", spec, opts, progress=False, encoded=ref_enc)

    real = methods.compress_layers
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # block 1's second group
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(methods, "compress_layers", failing)
    with pytest.raises(KeyboardInterrupt):
        compress.compress_model(streaming.open_model(bf16_dir / "model"), windows, "awp", spec, opts, progress=False,
                                run_dir=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("block_*")) == ["block_0000.safetensors"]
    monkeypatch.setattr(methods, "compress_layers", real)
    model = streaming.open_model(bf16_dir / "model")
    enc = {}
    compress.compress_model(model, windows, "awp", spec, opts, progress=False, run_dir=tmp_path / "run", encoded=enc)
    want = ref.weights()
    for k in model.tensor_names():
        assert np.array_equal(model.tensor(k).astype(np.float32), want[k]), k
    # the encoded layers stay on disk (block 0 resumed, blocks 1-2 compressed now), read back field by field
    from awp_jax import runstore

    assert list(enc) == list(ref_enc) and all(isinstance(e, runstore.StoredLayer) for e in enc.values())
    for k, e in enc.items():
        assert set(e) == set(ref_enc[k]) and e["meta"] == ref_enc[k]["meta"] and "perm" not in e, k
        assert all(np.array_equal(e[f], ref_enc[k][f]) for f in e if f != "meta"), k
    with pytest.raises(ValueError, match="needs run_dir"):
        compress.compress_model(streaming.open_model(bf16_dir / "model"), windows, "awp", spec, opts, progress=False)


def test_streamed_peak_memory_does_not_grow_with_the_number_of_blocks(tmp_path):
    """Peak RSS of a whole ``--stream`` run (calibration, compression, evaluation, writing) with 2
    and with 5 blocks of 50 MB (float32) each: the 3 extra blocks may not add half of one block."""
    text = tmp_path / "text.jsonl"
    rng = np.random.default_rng(0)
    words = "the of and a in to is was for on as with by he at from his an were are which this".split()
    text.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 400))}) for _ in range(10)))
    peaks = {}
    for n in (2, 5):
        cfg = _config(n, hidden=1024, inter=2816, heads=8, kv=8)
        block = sum(np.prod(s) for k, s in Llama.Block.shapes(cfg, 0).items()) * 4
        _write_model(tmp_path / f"m{n}", cfg)
        args = ["compress", "--stream", "--model", str(tmp_path / f"m{n}"), "--method", "wanda", "--calib", str(text),
                "--nsamples", "4", "--seqlen", "64", "--eval-text", str(text), "--eval-seqlen", "64", "--eval-windows", "2",
                "--out", str(tmp_path / f"o{n}")]
        # VmHWM (memory.peak_rss_mb), not getrusage: a child's ru_maxrss can start at its parent's size
        code = ("import sys; from awp_jax.cli import main; from awp_jax.memory import peak_rss_mb; rc = main(sys.argv[1:]); "
                "print('MAXRSS', peak_rss_mb()); sys.exit(rc)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        peaks[n] = float(res.stdout.split("MAXRSS")[1].split()[0]) * 2**20
    grew = peaks[5] - peaks[2]
    assert grew < block / 2, f"peak RSS {peaks}: 3 more blocks of {block / 1e6:.0f} MB added {grew / 1e6:.0f} MB"


def test_a_streamed_run_writes_compressed_tensors_as_the_in_memory_run_does(bf16_dir, tmp_path):
    """``--stream --format compressed-tensors``: the packed layers are read back from the run
    directory one at a time, and the file holds what the in-memory run's holds."""
    from safetensors import safe_open

    ct = ["--format", "compressed-tensors", "--bits", "4", "--group-size", "64", "--no-symmetric"]
    assert main(_cmd(bf16_dir, tmp_path / "mem", *ct)) == 0
    assert main(_cmd(bf16_dir, tmp_path / "stream", *ct, "--stream")) == 0
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("mem", "stream"))
    assert ca == cb and cb["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    with safe_open(str(tmp_path / "mem" / "model.safetensors"), "numpy") as fa, \
            safe_open(str(tmp_path / "stream" / "model.safetensors"), "numpy") as fb:
        assert set(fa.keys()) == set(fb.keys()) and any(k.endswith("weight_zero_point") for k in fb.keys())
        for k in fa.keys():
            a, b = fa.get_tensor(k), fb.get_tensor(k)
            assert a.dtype == b.dtype and np.array_equal(a, b), k
    ra, rb = (json.loads((tmp_path / n / "awp_report.json").read_text()) for n in ("mem", "stream"))
    assert ra["perplexity"] == rb["perplexity"]


def _orbax_equal(a_dir, b_dir):
    """Two orbax directories hold the same tensors and compressed layers, field by field."""
    ma, pa, ea = packed.load_orbax(a_dir)
    mb, pb, eb = packed.load_orbax(b_dir)
    assert ma["layers"] == mb["layers"] and ma["params"] == mb["params"] and ma["config"] == mb["config"]
    assert set(pa) == set(pb) and all(np.asarray(pa[k]).dtype == np.asarray(pb[k]).dtype and np.array_equal(pa[k], pb[k]) for k in pa)
    assert set(ea) == set(eb) and ea
    for k in ea:
        assert set(ea[k]) == set(eb[k]), k
        assert all(np.array_equal(ea[k][f], eb[k][f]) for f in ea[k] if f != "meta"), k


def test_a_streamed_run_writes_the_orbax_forms_as_the_in_memory_run_does(bf16_dir, tmp_path):
    """``--stream`` with ``--format orbax`` and ``--format hf``'s ``compressed/``: written one block at
    a time (orbax partial saves), holding what the in-memory run's hold; the streamed orbax output
    loads as the model the report evaluated."""
    quant = ["--bits", "4", "--group-size", "64"]
    assert main(_cmd(bf16_dir, tmp_path / "mem-orbax", "--format", "orbax", *quant)) == 0  # = an in-memory hf run's compressed/
    for fmt in ("orbax", "hf"):
        assert main(_cmd(bf16_dir, tmp_path / f"stream-{fmt}", "--format", fmt, *quant, "--stream")) == 0
    _orbax_equal(tmp_path / "mem-orbax", tmp_path / "stream-orbax")
    _orbax_equal(tmp_path / "mem-orbax", tmp_path / "stream-hf" / "compressed")
    dense = checkpoints.load_hf_dir(tmp_path / "stream-hf")[1]
    mem = checkpoints.load_model(tmp_path / "stream-orbax", storage_dtype="auto", with_tokenizer=False)[0].weights()
    assert set(dense) == set(mem) and all(np.array_equal(dense[k].astype(np.float32), mem[k]) for k in dense)


def test_an_orbax_directory_streams_tensor_by_tensor_and_gives_the_in_memory_run(bf16_dir, tmp_path):
    """An orbax directory (a run's ``compressed/`` form: compressed layers beside dense tensors) is
    restored one tensor at a time, compressed layers decoded; the streamed model holds what the
    in-memory load holds, and a whole ``--stream`` run from it equals the in-memory one."""
    import shutil

    model, tok = checkpoints.load_model(bf16_dir / "model", storage_dtype="auto")
    windows = np.random.default_rng(0).integers(0, 2000, (4, 64)).astype(np.int32)
    enc = {}
    compress.compress_model(model, windows, "wanda", methods.Constraint(sparsity=0.5), progress=False, encoded=enc)
    orb = tmp_path / "orb"
    checkpoints.save_orbax_model(model, orb, tokenizer=tok, encoded=enc)
    streamed = streaming.open_model(orb)
    assert streamed.cfg.storage_dtype == "bfloat16" and set(streamed.tensor_names()) == set(model.weights())
    mem = checkpoints.load_model(orb, storage_dtype="auto", with_tokenizer=False)[0].weights()
    for k in streamed.tensor_names():
        t = streamed.tensor(k)
        assert t.dtype == dtypes.np_dtype("bfloat16") and np.array_equal(t.astype(np.float32), mem[k]), k

    _assert_streamed_run_equals_in_memory(bf16_dir, orb, tmp_path, dtypes.np_dtype("bfloat16"))

    shutil.rmtree(next(p for p in (orb / "state").iterdir() if p.is_dir()))  # the tensors' data files
    with pytest.raises(checkpoints.CheckpointError, match="orb"):
        src = streaming.open_model(orb)
        src.tensor(src.tensor_names()[-1])


def test_a_missing_or_truncated_shard_is_named(bf16_dir, tmp_path):
    import shutil

    d = tmp_path / "sharded"
    shutil.copytree(bf16_dir / "model", d)
    (d / "model.safetensors").unlink()
    m = streaming.open_model(bf16_dir / "model")
    from awp_jax.formats.hf import write_safetensors

    specs = {k: (m.source.spec(k)[0], m.tensor_dtype(k)) for k in m.tensor_names()}
    write_safetensors(d, specs, m.tensor, max_shard_size="300KB")
    shards = sorted(d.glob("model-*.safetensors"))
    (shards[-1]).unlink()
    with pytest.raises(checkpoints.CheckpointError, match=f"missing shard .*{shards[-1].name}"):
        streaming.open_model(d)
    shards[-2].write_bytes(shards[-2].read_bytes()[:1000])
    shutil.copy(shards[0], shards[-1])  # present again, but not holding what the index places there
    with pytest.raises(checkpoints.CheckpointError, match=f"{shards[-2].name}.*truncated or corrupt"):
        streaming.open_model(d)


def test_stream_refusals(bf16_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="streaming reads a Hugging Face directory .* or a GGUF file"):
        streaming.open_model(tmp_path / "empty")
    for extra, message in [
        (["--max-shard-size", "lots"], "max shard size must be"),
        (["--format", "orbax", "--max-shard-size", "1GB"], "--max-shard-size is an option of another output format"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(_cmd(bf16_dir, tmp_path / "x", *extra))
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()
