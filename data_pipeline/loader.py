"""Streaming token batches from WebDataset token shards: split by node and worker, shuffled, resumable.

Epoch mode, epoch e (seed s): the split's shards are permuted with rng(s, e) and dealt round-robin
to the R x W slots (rank, DataLoader worker), ranks first, so every slot gets whole shards and
ranks differ by at most one shard. When there are fewer shards than slots, each shard is cut
into ceil(slots / shards) interleaved parts (sample j goes to part j mod parts) and the parts are
dealt instead, so no slot idles. Each slot streams its shards in order through a shuffle buffer
seeded by (s, e, rank, worker) and cuts batches of ``batch_size`` (its last batch may be short;
a batch never mixes workers). The rank's batches come from its workers strictly round-robin,
skipping finished workers. Hence every sample of the split appears exactly once per epoch over
all ranks, and the whole stream is a pure function of (seed, world size, workers, batch size).

Resume guarantee: ``state_dict()`` holds the epoch, the batches taken in it, the total batches
taken and the layout (seed, world size, workers, batch size, shuffle buffer). ``load_state_dict``
on a stream with the same layout continues exactly where the saved stream stopped: the rest of
that epoch, with no sample repeated and none skipped (the workers fast-forward through their
consumed batches without collating them). A rank that loads another rank's state (data-parallel
ranks consume batches in lockstep) finds its own position from the total.

Re-split (``resume_from`` with the states of every rank of the saved run, when the world size,
workers or batch size changed): a sample is (shard, position in the shard), and the saved
layout's order is a pure function of its state, so the samples every old rank had consumed are
recomputed exactly (no shard is read). The new layout restarts the oldest unfinished epoch with
those samples excluded (and the next epoch too, where a rank had already begun it). Within an
epoch no sample repeats and none is skipped; only the epoch's order differs from an
uninterrupted run's. Resampled mode draws shards with replacement forever; it has no epochs, and
a resumed stream is re-seeded by the total batches taken so it does not replay the batches
already seen.

``with_keys`` adds each sample's WebDataset key to its batch (``batch["keys"]``), to tell which
samples a run has seen.

Token range: every batch is checked on the CPU, in the worker that cuts it, against the manifest's
``vocab_size`` (one comparison per batch); a token outside it (a corrupt or foreign shard) is a one-line
``UserError`` naming the shard and the sample's key, raised in the training process, so no device ever
indexes an embedding with it (the training step itself has no host sync to check it there).

Augmentation (``hflip``, ``random_crop``; ``igpt.data_pipeline.augment``) happens in the workers, per
sample, drawn from (seed, epoch, shard index, position in the shard): a resumed or re-split stream
gives every sample the augmentation the uninterrupted stream gives it. A split stored with a margin
is cut to the training size: random crops with ``random_crop``, else the centre crop (also in
``iterate_split``, which never flips). A patch model's random orders (``patch_orders``,
``igpt.data_pipeline.order``) are drawn in the same place from the same key, so they resume exactly too.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import random
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from igpt.data_pipeline.augment import Augment
from igpt.data_pipeline.manifest import Manifest, ShardInfo
from igpt.data_pipeline.order import PatchOrder
from igpt.data_pipeline.shard import npy_header
from igpt.data_pipeline.tario import iter_members
from igpt.errors import UserError

Unit = tuple[str, int, int, int]  # (shard path, part, parts, samples in that part)


_header = functools.lru_cache(npy_header)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


class Sample(NamedTuple):
    index: int  # position in its shard
    key: str
    tokens: np.ndarray  # uint16 view, (R*R,)
    label: int | None
    shard: str  # the shard's path
    order: np.ndarray | None = None  # its random patch order (``patch_orders``), else None


def read_shard(path: str, resolution: int, part: int = 0, parts: int = 1) -> Iterator[tuple[np.ndarray, int | None]]:
    """(tokens uint16 view, label or None) for the samples j of a token shard with j % parts == part."""
    for sample in read_samples(path, resolution, part, parts):
        yield sample.tokens, sample.label


def read_samples(path: str, resolution: int, part: int = 0, parts: int = 1,
                 excluded: np.ndarray | None = None) -> Iterator[Sample]:
    """The samples j of a token shard with j % parts == part and not ``excluded[j]``."""
    with open(path, "rb") as f:
        data = f.read()
    header = _header(resolution)
    hlen, ntok = len(header), resolution * resolution
    key, tokens, label, j = None, None, None, 0
    def wanted(j: int) -> bool:
        return j % parts == part and (excluded is None or not excluded[j])

    for name, offset, size in iter_members(data, path):
        k, _, ext = name.partition(".")
        if k != key:
            if tokens is not None:
                if wanted(j):
                    yield Sample(j, key, tokens, label, path)
                j += 1
            key, tokens, label = k, None, None
        if ext == "tokens.npy":
            if size == hlen + 2 * ntok and data[offset : offset + hlen] == header:
                tokens = np.frombuffer(data, np.uint16, ntok, offset + hlen)
            else:
                raise UserError(f"{path}:{name} is not a uint16 token array of the split's stored resolution")
        elif ext == "cls":
            label = int(data[offset : offset + size])
    if tokens is not None and wanted(j):
        yield Sample(j, key, tokens, label, path)


def deal_units(shards: list[ShardInfo], data_dir: Path, slots: int, seed: int, epoch: int) -> list[list[Unit]]:
    """The units (shard parts) each slot reads in an epoch; slot index = worker * world + rank."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    parts = -(-slots // len(shards)) if shards else 1
    units = [
        (str(data_dir / shards[i].file), p, parts, -(-(shards[i].num_samples - p) // parts))
        for i in order
        for p in range(parts)
    ]
    return [units[s::slots] for s in range(slots)]


def _batches(samples: Iterator[Sample], batch_size: int, vocab_size: int, labels: bool, keys: bool = False):
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == batch_size:
            yield _collate(buf, vocab_size, labels, keys)
            buf = []
    if buf:
        yield _collate(buf, vocab_size, labels, keys)


def _collate(buf: list[Sample], vocab_size: int, labels: bool,
             keys: bool) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, np.ndarray | None]:
    """A batch's arrays; a token outside the vocabulary (a corrupt or foreign shard) is refused here, on the CPU,
    with one comparison per batch, so that no device ever indexes its embedding with it."""
    tokens = np.stack([s.tokens for s in buf])
    if tokens.max() >= vocab_size:
        bad = buf[int(np.argmax(tokens.max(axis=1) >= vocab_size))]
        raise UserError(f"{bad.shard}: sample {bad.key!r} holds token {int(bad.tokens.max())}, outside the "
                        f"vocabulary of {vocab_size} tokens that the manifest gives")
    return (tokens, np.array([s.label for s in buf], dtype=np.int64) if labels else None,
            [s.key for s in buf] if keys else None, None if buf[0].order is None else np.stack([s.order for s in buf]))


def _shuffled(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


class _SlotStream(IterableDataset):
    """What one DataLoader worker of one rank produces: tagged numpy batches."""

    def __init__(self, stream: "TokenStream", epoch: int, skips: list[int]):
        self.s, self.epoch, self.skips = stream, epoch, skips

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        s = self.s
        workers = max(s.num_workers, 1)
        slot = worker * s.world_size + s.rank
        if s.mode == "epoch":
            units = deal_units(s.shards, s.data_dir, s.world_size * workers, s.seed, self.epoch)[slot]
        else:
            units = _resampled_units(s, worker, self.epoch)
        # the augmentation's epoch: the epoch, or in resampled mode the draw (a shard may be drawn again)
        samples = (x for k, unit in enumerate(units)
                   for x in s.unit_samples(unit, self.epoch, self.epoch if s.mode == "epoch" else
                                           (self.epoch, s.rank, worker, k)))
        samples = s.shuffled(samples, self.epoch, worker)
        # fast-forward past the batches a resumed run already consumed, without collating them
        samples = itertools.islice(samples, self.skips[worker] * s.batch_size, None)
        try:
            for batch in _batches(samples, s.batch_size, s.manifest.vocab_size, s.with_labels, s.with_keys):
                yield worker, *batch
        except UserError as e:  # a bad shard: handed over, so the user sees its one line, not a worker's traceback
            yield worker, e, None, None, None


def _resampled_units(s: "TokenStream", worker: int, resume: int) -> Iterator[Unit]:
    rng = random.Random(_seed("resampled", s.seed, resume, s.rank, worker))
    while True:
        shard = s.shards[rng.randrange(len(s.shards))]
        yield str(s.data_dir / shard.file), 0, 1, shard.num_samples


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader worker start-up: a preemption signal sent to the whole process group (SLURM, ``timeout``,
    ``kill -- -PGID``, Ctrl-C) is for the training process, which checkpoints and then stops its workers
    itself; a worker killed by it would fail the step instead. Workers still exit with their parent."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _to_torch(item):
    worker, tokens, labels, keys, orders = item
    if isinstance(tokens, UserError):
        return item
    return (worker, torch.from_numpy(tokens), None if labels is None else torch.from_numpy(labels), keys,
            None if orders is None else torch.from_numpy(orders))


def _unpacked(item: tuple) -> tuple[int, list]:
    """(worker, batch) of one item of ``_loader``; a worker's UserError (see ``_SlotStream``) is raised here, in
    the consumer's frame, which drops the loader when it unwinds: no kept traceback holds the loader's workers
    (they ignore SIGTERM, so one alive at interpreter exit would block it)."""
    worker, *batch = item
    if isinstance(batch[0], UserError):
        raise batch[0]
    return worker, batch


Masks = dict[int, np.ndarray]  # shard index → bool mask over the shard's samples


def _pack(excluded: dict[int, Masks]) -> dict:
    return {e: {i: (len(m), np.packbits(m).tobytes()) for i, m in masks.items()} for e, masks in excluded.items()}


def _unpack(packed: dict) -> dict[int, Masks]:
    return {int(e): {int(i): np.unpackbits(np.frombuffer(b, np.uint8), count=n).astype(bool) for i, (n, b) in m.items()}
            for e, m in packed.items()}


class TokenStream:
    """Endless batches ``{"tokens": LongTensor (B, R*R)[, "labels": LongTensor (B,)]}`` of one split
    (``pin_memory``: the tokens in page-locked memory, for asynchronous copies to a GPU); ``patch_orders=N`` adds
    ``"order"``, LongTensor (B, N), a random permutation of N patches per sample (``igpt.data_pipeline.order``)."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        mode: str = "epoch",
        with_labels: bool = False,
        pin_memory: bool = False,
        with_keys: bool = False,
        hflip: bool = False,
        random_crop: bool = False,
        patch_orders: int = 0,
    ):
        if mode not in ("epoch", "resampled"):
            raise UserError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        info = self.manifest.split(split)
        if not info.shards:
            raise UserError(f"split {split!r} of {self.data_dir} has no samples")
        if with_labels and not self.manifest.labelled:
            raise UserError(f"{self.data_dir} has no class labels (with_labels=True)")
        missing = [sh.file for sh in info.shards if not (self.data_dir / sh.file).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.data_dir}: shards in the manifest are missing: {missing[:5]}")
        self.split, self.shards, self.num_samples = split, info.shards, info.num_samples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.mode, self.with_labels, self.pin_memory, self.with_keys = mode, with_labels, pin_memory, with_keys
        self.shard_index = {str(self.data_dir / sh.file): i for i, sh in enumerate(self.shards)}
        # epoch → samples already seen in it before a re-split (see resume_from); empty otherwise
        self.excluded: dict[int, Masks] = {}
        self.resolution = self.manifest.resolution
        self.augment = Augment(self.resolution, info.stored_resolution, hflip, random_crop, seed)
        self.order = PatchOrder(patch_orders, seed) if patch_orders else None
        self.palette_sha256 = self.manifest.palette_sha256
        self.epoch = 0
        self.batches_in_epoch = 0
        self.total_batches = 0

    # -- schedule -------------------------------------------------------------------------
    def _units(self, epoch: int, worker: int) -> list[Unit]:
        slots = deal_units(self.shards, self.data_dir, self.world_size * max(self.num_workers, 1), self.seed, epoch)
        return slots[worker * self.world_size + self.rank]

    def _unit_indices(self, unit: Unit, epoch: int) -> np.ndarray:
        """Positions in its shard of a unit's samples that this epoch reads."""
        path, part, parts, _ = unit
        shard = self.shard_index[path]
        j = np.arange(part, self.shards[shard].num_samples, parts)
        mask = self.excluded.get(epoch, {}).get(shard)
        return j if mask is None else j[~mask[j]]

    def unit_samples(self, unit: Unit, epoch: int, augment_epoch: object) -> Iterator[Sample]:
        """A unit's samples that ``epoch`` reads, augmented as drawn for ``augment_epoch``."""
        path, part, parts, _ = unit
        shard = self.shard_index[path]
        samples = read_samples(path, self.augment.stored, part, parts, self.excluded.get(epoch, {}).get(shard))
        if not self.augment.identity:
            samples = (x._replace(tokens=self.augment(x.tokens, augment_epoch, shard, x.index)) for x in samples)
        if self.order is not None:
            samples = (x._replace(order=self.order(augment_epoch, shard, x.index)) for x in samples)
        return samples

    def shuffled(self, samples: Iterator, epoch: int, worker: int) -> Iterator:
        """A worker's samples (or their ids) in the epoch's order: the seeded shuffle buffer."""
        if self.shuffle_buffer <= 1:
            return samples
        return _shuffled(samples, self.shuffle_buffer, random.Random(_seed(self.seed, epoch, self.rank, worker)))

    def worker_batches(self, epoch: int) -> list[int]:
        """Batches each of this rank's workers yields in an epoch (epoch mode)."""
        sizes = [sum(len(self._unit_indices(u, epoch)) for u in self._units(epoch, w))
                 for w in range(max(self.num_workers, 1))]
        return [-(-n // self.batch_size) for n in sizes]

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch (the current one by default)."""
        return sum(self.worker_batches(self.epoch if epoch is None else epoch))

    def _schedule(self, epoch: int) -> list[int]:
        counts = self.worker_batches(epoch)
        return [w for k in range(max(counts, default=0)) for w in range(len(counts)) if k < counts[w]]

    # -- iteration ------------------------------------------------------------------------
    def _loader(self, epoch: int, skips: list[int]) -> Iterator:
        ds = _SlotStream(self, epoch, skips)
        if self.num_workers == 0:
            return map(_to_torch, iter(ds))
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_to_torch,
                               prefetch_factor=4, worker_init_fn=_ignore_preemption_signals))

    def _emit(self, tokens: torch.Tensor, labels: torch.Tensor | None, keys: list[str] | None,
              orders: torch.Tensor | None) -> dict:
        self.batches_in_epoch += 1
        self.total_batches += 1
        tokens = tokens.long()
        # page-locked, so that ``.to("cuda", non_blocking=True)`` is a real async copy, not a host sync
        out = {"tokens": tokens.pin_memory() if self.pin_memory else tokens}
        if labels is not None:
            out["labels"] = labels
        if keys is not None:
            out["keys"] = keys
        if orders is not None:
            out["order"] = orders.pin_memory() if self.pin_memory else orders
        return out

    def iter_epoch(self) -> Iterator[dict]:
        """The rest of the current epoch (all of it when at its start); then the epoch advances."""
        if self.mode == "resampled":
            raise UserError("resampled mode has no epochs; iterate the stream itself")
        schedule = self._schedule(self.epoch)
        done = schedule[: self.batches_in_epoch]
        skips = [done.count(w) for w in range(max(self.num_workers, 1))]
        pending: dict[int, list] = {}
        source = self._loader(self.epoch, skips)
        try:
            for want in schedule[self.batches_in_epoch :]:
                while not pending.get(want):
                    got = next(source, None)
                    if got is None:
                        raise RuntimeError(f"{self.data_dir}: shards hold fewer samples than the manifest says")
                    worker, batch = _unpacked(got)
                    pending.setdefault(worker, []).append(batch)
                yield self._emit(*pending[want].pop(0))
        finally:  # an error's traceback keeps this frame: without the loader its workers stop now, not never
            del source  # (they ignore SIGTERM, so one left at interpreter exit would block it)
        self.excluded.pop(self.epoch, None)
        self.epoch += 1
        self.batches_in_epoch = 0

    def __iter__(self) -> Iterator[dict]:
        if self.mode == "resampled":
            source = self._loader(self.total_batches, [0] * max(self.num_workers, 1))
            try:
                for got in source:
                    yield self._emit(*_unpacked(got)[1])
            finally:  # as in iter_epoch: a kept traceback must not keep the loader
                del source
        else:
            while True:
                yield from self.iter_epoch()

    # -- resume ---------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {
            "mode": self.mode,
            "split": self.split,
            "world_size": self.world_size,
            "num_workers": max(self.num_workers, 1),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """The position: epoch, batches taken in it, total batches, the samples a re-split excluded from the
        current epochs, and the layout it is valid for."""
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "total_batches": self.total_batches,
                "rank": self.rank, "excluded": _pack(self.excluded), **self._layout()}

    def _same_layout(self, state: dict) -> bool:
        return all(state.get(k, self.shuffle_buffer if k == "shuffle_buffer" else None) == v
                   for k, v in self._layout().items())

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (see the module docstring for the guarantee). With another
        layout and only this one state, the stream starts the next epoch: use ``resume_from``."""
        self.total_batches = state["total_batches"]
        self.excluded = _unpack(state.get("excluded", {}))
        same = self._same_layout(state)
        if self.mode == "resampled":
            self.epoch, self.batches_in_epoch = 0, 0
        elif not same:
            warnings.warn(f"data layout changed ({state} -> {self._layout()}): starting epoch {state['epoch'] + 1}")
            self.epoch, self.batches_in_epoch = state["epoch"] + 1, 0
        elif state.get("rank") == self.rank:
            self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        else:
            self.epoch, left = 0, state["total_batches"]
            while left >= (n := self.batches_per_epoch(self.epoch)):
                self.epoch, left = self.epoch + 1, left - n
            self.batches_in_epoch = left


    def resume_from(self, states: list[dict]) -> str:
        """Continue from the states of every rank of a saved run (index = saved rank): exactly, with the
        same layout; else re-split (module docstring). Returns what happened, for the log."""
        if len(states) == self.world_size and all(self._same_layout(s) for s in states):
            self.load_state_dict(states[self.rank])
            return "same layout: exact continuation"
        if self.mode == "resampled":
            self.load_state_dict(states[0])
            return "resampled stream re-seeded"
        first = min(s["epoch"] for s in states)
        self.excluded = self._seen_by(states, first)
        self.epoch, self.batches_in_epoch = first, 0
        self.total_batches = max(s["total_batches"] for s in states)
        seen = int(sum(m.sum() for m in self.excluded.get(first, {}).values()))
        old = states[0]
        return (f"re-split from {len(states)} rank(s) x {old['num_workers']} worker(s), batch {old['batch_size']}: "
                f"epoch {first} continues without its {seen} samples already seen")

    def _seen_by(self, states: list[dict], first: int) -> dict[int, Masks]:
        """Samples each epoch from ``first`` on had given out, over every saved rank (recomputed, no I/O)."""
        seen: dict[int, Masks] = {}

        def mark(epoch: int, shard: int, indices: np.ndarray) -> None:
            masks = seen.setdefault(epoch, {})
            if shard not in masks:
                masks[shard] = np.zeros(self.shards[shard].num_samples, bool)
            masks[shard][indices] = True

        for rank, state in enumerate(states):
            old = TokenStream(self.data_dir, self.split, state["batch_size"], rank=rank, world_size=len(states),
                              num_workers=state["num_workers"], seed=state["seed"],
                              shuffle_buffer=state.get("shuffle_buffer", self.shuffle_buffer))
            old.excluded = _unpack(state.get("excluded", {}))
            for epoch in range(first, state["epoch"] + 1):
                for shard, masks in old.excluded.get(epoch, {}).items():
                    mark(epoch, shard, np.flatnonzero(masks))
                taken = old._schedule(epoch)
                if epoch == state["epoch"]:
                    taken = taken[: state["batches_in_epoch"]]
                for worker in range(max(old.num_workers, 1)):
                    ids = [(old.shard_index[u[0]], int(j)) for u in old._units(epoch, worker)
                           for j in old._unit_indices(u, epoch)]
                    ids = list(old.shuffled(iter(ids), epoch, worker))[: taken.count(worker) * old.batch_size]
                    if ids:
                        shards, positions = np.array(ids).T
                        for shard in np.unique(shards):
                            mark(epoch, int(shard), positions[shards == shard])
        return seen


def iterate_split(data_dir: str | Path, split: str, batch_size: int, with_labels: bool = False) -> Iterator[dict]:
    """One ordered, finite pass over a split (shards in manifest order, no shuffling), in this process; a
    split stored with a margin is centre-cropped to the training size."""
    data_dir = Path(data_dir)
    manifest = Manifest.load(data_dir)
    info = manifest.split(split)
    if with_labels and not manifest.labelled:
        raise UserError(f"{data_dir} has no class labels (with_labels=True)")
    centre = Augment(manifest.resolution, info.stored_resolution)
    samples = (x._replace(tokens=centre(x.tokens, 0, 0, 0)) for sh in info.shards
               for x in read_samples(str(data_dir / sh.file), centre.stored))
    for tokens, labels, _, _ in _batches(samples, batch_size, manifest.vocab_size, with_labels):
        out = {"tokens": torch.from_numpy(tokens).long()}
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        yield out
