"""One process's share of a job: the torchrun world it belongs to (a plain `python` run is a world of one)
and the deterministic batches of indices it takes from each global batch. Pretraining and the supervised
critic train through these."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), world, local)


class BatchStream:
    """Deterministic batches of indices: epoch e is randperm(N) seeded by (seed, e), so a resumed
    run sees exactly the batches an uninterrupted one would. Each rank takes its slice of every
    global batch."""

    def __init__(self, n: int, batch: int, seed: int, dist_info: Dist, consumed: int = 0):
        if batch % dist_info.world:
            raise ConfigError(f"batch_size={batch} is not divisible by the {dist_info.world} processes")
        if n < batch:
            raise ConfigError(f"only {n} training images for batch_size={batch}")
        self.n, self.batch, self.seed, self.dist = n, batch, seed, dist_info
        self.per_epoch = n // batch            # drop the ragged end of each epoch
        self.consumed = consumed               # global batches served so far
        self._epoch, self._perm = -1, None

    def next(self) -> torch.Tensor:
        epoch, pos = divmod(self.consumed, self.per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self._epoch = epoch
        idx = self._perm[pos * self.batch:(pos + 1) * self.batch]
        self.consumed += 1
        return idx[self.dist.rank::self.dist.world]
