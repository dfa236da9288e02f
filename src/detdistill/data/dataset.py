"""Torch datasets over a :class:`DetectionSet`, the step-indexed sampler and the collate function.

Reproducible, resumable training data: :class:`StepBatchSampler` yields, for each optimiser
step, a list of ``(index, seed)`` pairs that depends only on ``(seed, step, rank)``;
:class:`TrainDataset` augments ``index`` with ``seed``. Restarting at ``start_step=s`` therefore
replays exactly the batches an uninterrupted run would have seen, with any number of workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from detdistill.data.image_io import decode_image
from detdistill.data.sample import DetectionSet
from detdistill.data.transforms import EvalTransform, TrainTransform
from detdistill.structures import Batch, Target

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a cheap bijective hash with good avalanche on 64-bit ints."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, step: int, position: int) -> int:
    """Augmentation seed of the sample at ``position`` of the global batch of ``step`` (63 bits)."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ step) ^ position) >> 1


class _ImageSource:
    """Decodes (and optionally caches) the images of a :class:`DetectionSet`."""

    def __init__(self, data: DetectionSet, cache_images: bool) -> None:
        self.data = data
        self.cache_images = cache_images
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.data.samples)

    def load_image(self, index: int) -> Tensor:
        """``(3, H, W)`` uint8 image of sample ``index`` (from the RAM cache when enabled)."""
        img = self._cache.get(index)
        if img is None:
            s = self.data.samples[index]
            img = decode_image(s.path)
            if tuple(img.shape[1:]) != (s.height, s.width):
                raise ValueError(
                    f"{s.path}: decoded size {img.shape[2]}x{img.shape[1]} differs from the header size "
                    f"{s.width}x{s.height} the boxes refer to"
                )
            if self.cache_images:
                self._cache[index] = img
        return img

    def preload(self) -> None:
        """Decode every image into the cache now (call before forking DataLoader workers, so
        they share the decoded pages instead of each filling its own cache)."""
        if not self.cache_images:
            raise RuntimeError("preload() needs cache_images=True")
        for i in range(len(self)):
            self.load_image(i)


class TrainDataset(_ImageSource, Dataset):
    """Augmented training crops; indexed by ``(index, seed)`` pairs from :class:`StepBatchSampler`.

    Args:
        data: the loaded dataset.
        transform: the augmentation (typically :class:`TrainTransform`).
        cache_images: keep decoded ``uint8`` images in RAM (3 bytes/px: a 4000x2250 image is
            27 MB; off by default). Each DataLoader worker has its own cache unless
            :meth:`preload` ran before the workers were started.
    """

    def __init__(self, data: DetectionSet, transform: TrainTransform, cache_images: bool = False) -> None:
        super().__init__(data, cache_images)
        self.transform = transform

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, Target]:
        """``(index, seed)`` -> ``((3, S, S) float32 image in [0, 1], Target)``."""
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(
                f"TrainDataset is indexed by (index, seed) tuples (use StepBatchSampler), got {item!r}"
            )
        index, seed = item
        return self.transform(self.load_image(index), self.data.samples[index], seed)


class EvalDataset(_ImageSource, Dataset):
    """Full images at native resolution, by plain index (crowd boxes omitted from the Target).

    Evaluation code that needs crowd regions reads ``data.samples[i].iscrowd`` directly.
    """

    def __init__(
        self, data: DetectionSet, transform: EvalTransform | None = None, cache_images: bool = False
    ) -> None:
        super().__init__(data, cache_images)
        self.transform = transform if transform is not None else EvalTransform()

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        """``index`` -> ``((3, H, W) float32 image in [0, 1], Target)``."""
        return self.transform(self.load_image(index), self.data.samples[index])


class StepBatchSampler:
    """Infinite, resumable stream of per-rank batches of ``(index, seed)`` pairs.

    The sample stream is the concatenation of epoch permutations, epoch ``e`` being
    ``torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + e))``. The
    global batch of step ``s`` is entries ``[s*G, (s+1)*G)`` of that stream with
    ``G = batch_size * world_size`` (batches run across epoch boundaries), and rank ``r``
    takes entries ``[r*batch_size, (r+1)*batch_size)`` of it. Each entry's augmentation seed
    is :func:`sample_seed` ``(seed, s, position in the global batch)``.

    Everything is a function of ``(seed, step)``, so ``start_step`` resumes exactly and the
    ranks of a step partition its global batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples and batch_size must be positive, got {num_samples}, {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_step, self.world_size, self.rank = start_step, world_size, rank
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
            if len(self._perms) >= 4:  # a step touches at most a few epochs; keep memory flat
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's ``batch_size`` ``(index, seed)`` pairs of ``step``."""
        g = self.batch_size * self.world_size
        out = []
        for j in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            epoch, offset = divmod(step * g + j, self.num_samples)
            out.append((self._perm(epoch)[offset], sample_seed(self.seed, step, j)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in itertools.count(self.start_step):
            yield self.batch(step)


def collate(items: list[tuple[Tensor, Target]]) -> Batch:
    """``[(image (3, H_i, W_i), Target), ...]`` -> :class:`Batch` (no padding; adapters pad)."""
    return Batch([im for im, _ in items], [t for _, t in items])
