"""SSIM forward + backward speed: detdistill's loss against pytorch-msssim and kornia at matched values.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_ssim.py [--shape 8 128 64 64] [--reps 5]

Each library computes the mean SSIM of the same two float32 batches in [0, 1] with an 11-tap
Gaussian window (sigma 1.5), K1 0.01, K2 0.03 and 'valid' borders, so the values agree (they
are printed; they must match to ~1e-6); the timing is the best of ``--reps`` runs of one
forward and one backward (gradient for the first input). pytorch-msssim and kornia are not
dependencies of detdistill: ``pip install pytorch-msssim kornia`` to compare; a missing one
is skipped with a note.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from detdistill.losses.ssim import ssim_map


def _time(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, y0: torch.Tensor,
          reps: int) -> tuple[float, float]:
    best, value = float("inf"), float("nan")
    for _ in range(reps):
        x = x0.clone().requires_grad_(True)
        t = time.perf_counter()
        v = fn(x, y0)
        v.backward()
        best = min(best, time.perf_counter() - t)
        value = float(v.detach())
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[8, 128, 64, 64], metavar=("N", "C", "H", "W"))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(*args.shape, generator=g)
    y0 = (0.7 * x0 + 0.3 * torch.rand(*args.shape, generator=g)).clamp(0, 1)
    candidates: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "detdistill": lambda x, y: ssim_map(x, y).mean()}
    try:
        import pytorch_msssim

        candidates["pytorch-msssim"] = lambda x, y: pytorch_msssim.ssim(x, y, data_range=1.0, win_size=11,
                                                                        win_sigma=1.5, K=(0.01, 0.03))
    except ImportError:
        print("pytorch-msssim not installed: skipped")
    try:
        import kornia

        candidates["kornia"] = lambda x, y: kornia.metrics.ssim(x, y, 11, max_val=1.0, padding="valid").mean()
    except ImportError:
        print("kornia not installed: skipped")
    print(f"shape {tuple(args.shape)}, float32, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"best of {args.reps}")
    for name, fn in candidates.items():
        sec, value = _time(fn, x0, y0, args.reps)
        print(f"  {name:<15} {sec * 1000:8.1f} ms forward+backward   SSIM {value:.7f}")


if __name__ == "__main__":
    main()
