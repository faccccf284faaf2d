"""Throughput of ShapesWorld ``generate`` (scene sampling + render + captions) on one core.

    PYTHONPATH=src python scripts/bench_shapes.py --n 3000 --size 64 224

Prints a table of images/s per resolution and whether the 64 px target (>= 1000 images/s) is
met. Writes nothing to disk.
"""

from __future__ import annotations

import argparse
import os

# numpy/BLAS would not use threads here anyway, but pin them so the number is a one-core number
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402

from xclip.data.shapes import generate  # noqa: E402

TARGET_SIZE, TARGET_RATE = 64, 1000.0


def bench(n: int, size: int, seed: int = 0, repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` images/s and ms/image of ``generate(seed, i, size)`` for i < n."""
    generate(seed, 0, size=size)  # build the background textures for this size (cached)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            generate(seed, i, size=size)
        best = min(best, time.perf_counter() - start)
    return n / best, 1000.0 * best / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images per timing run (default 3000)")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 224], help="resolutions (default 64 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per size; the best is kept")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.repeats <= 0 or any(s <= 0 for s in args.size):
        parser.error("--n, --repeats and --size must be positive")

    print(f"ShapesWorld generate(), {args.n} images, best of {args.repeats}, one process")
    print(f"{'size':>6} {'images/s':>10} {'ms/image':>10}")
    rates = {}
    for size in args.size:
        rate, ms = bench(args.n, size, repeats=args.repeats)
        rates[size] = rate
        print(f"{size:>6} {rate:>10.0f} {ms:>10.3f}")
    if TARGET_SIZE in rates:
        met = rates[TARGET_SIZE] >= TARGET_RATE
        print(
            f"target >= {TARGET_RATE:.0f} images/s at {TARGET_SIZE} px: "
            f"{'MET' if met else 'NOT MET'} ({rates[TARGET_SIZE]:.0f} images/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
