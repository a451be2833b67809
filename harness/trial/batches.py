"""The training loop's view of the data: an endless stream of (x0, cond) on the right device.

Each rank reads its own resampled stream (harness/data/loader.py), seeded by the trial seed, the
rank and how often the trial has been resumed, so a resumed trial does not replay the batches it
saw before the interruption. Epochs are cut at `epoch_batches`, equal on every rank; the stream
simply restarts with the next epoch's seed.
"""

from __future__ import annotations

from harness.common.process_group import DistInfo
from harness.config import TrialConfig
from harness.data import make_loader
from harness.trial.conditioning import Conditioner

EPOCH_BATCHES = 10_000


class TrainBatches:
    def __init__(self, trial: TrialConfig, conditioner: Conditioner, dist: DistInfo, resume_count: int = 0):
        self.trial, self.conditioner, self.dist = trial, conditioner, dist
        self.seed = trial.train.seed + 1000 * resume_count
        self.epoch = 0
        self._loader = None
        self._it = None
        self._corrupt_before = 0  # corrupt samples counted by the epochs already finished

    def _open(self):
        d = self.trial.data
        loader = make_loader(
            d.shards, self.trial.micro_batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            num_workers=d.num_workers, resampled=True, epoch_batches=EPOCH_BATCHES, shuffle=d.shuffle_buffer,
            seed=self.seed + 7919 * self.epoch, flip=d.flip, conditioning=d.conditioning,
            text_embeddings=d.conditioning == "text" and d.text_encoder == "precomputed",
            pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
        )
        if self._loader is not None:
            self._corrupt_before += self._loader.corrupt
        self._loader = loader
        return iter(loader)

    def next(self):
        """(x0 [B, C, H, W] float32 on the device, cond dict for the denoiser)."""
        if self._it is None:
            self._it = self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._open()
            batch = next(self._it)
        x0 = batch["x"].to(self.dist.device, non_blocking=True)
        return x0, self.conditioner.from_batch(batch)

    def corrupt_count(self) -> int:
        return self._corrupt_before + (self._loader.corrupt if self._loader is not None else 0)

    def close(self) -> None:
        self._it = None
        self._loader = None
