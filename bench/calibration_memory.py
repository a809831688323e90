"""Peak memory of calibration on the default model, in a process that does nothing else.

    python bench/calibration_memory.py [--n 128] [--seqlen 512] [--mode sequential]

Prints the process's resident-set high-water mark after loading the model and tokenizing the
text, and after computing every block's statistics (handed to a callback, not kept).
"""

import argparse
import resource
import time

from awp_jax import calibration, checkpoints, data


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=128)
ap.add_argument("--seqlen", type=int, default=512)
ap.add_argument("--mode", default="sequential", choices=("sequential", "parallel"))
ap.add_argument("--batch-size", type=int, default=8)
args = ap.parse_args()
model, tok = checkpoints.load_default()
windows = data.calibration_windows(data.tokenize(tok, data.calibration_text()), args.n, args.seqlen, seed=0)
base = rss_mb()
t0 = time.perf_counter()
calibration.block_statistics(model, windows, mode=args.mode, batch_size=args.batch_size, on_block=lambda i, c: None)
print(f"| {args.mode} | {args.n} x {args.seqlen} | {args.batch_size} | {base:.0f} | {rss_mb():.0f} | {rss_mb() - base:.0f} | {time.perf_counter() - t0:.0f} |")
