"""The token-shard loader: exactly-once epochs across ranks and workers, determinism, resume, resampling."""
from __future__ import annotations

import itertools
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from igpt.data_pipeline.loader import TokenStream, deal_units, iterate_split
from igpt.data_pipeline.manifest import Manifest
from igpt.data_pipeline.tario import iter_members, tar_bytes
from igpt.errors import UserError


def _ids(batch: dict) -> list[bytes]:
    """A sample's identity: its token bytes (CIFAR images are distinct)."""
    return [row.numpy().astype(np.uint16).tobytes() for row in batch["tokens"]]


def _all_ids(data_dir, split) -> Counter:
    return Counter(i for b in iterate_split(data_dir, split, 64) for i in _ids(b))


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 2), (3, 2), (3, 0)])
def test_every_sample_once_per_epoch(cifar_tokens, world_size, num_workers):
    everything = _all_ids(cifar_tokens, "train")
    assert sum(everything.values()) == Manifest.load(cifar_tokens).split("train").num_samples
    for epoch in range(2):
        seen: Counter = Counter()
        for rank in range(world_size):
            s = TokenStream(cifar_tokens, "train", 32, rank=rank, world_size=world_size, num_workers=num_workers,
                            seed=5, shuffle_buffer=100, with_labels=True)
            s.epoch = epoch
            n = 0
            for b in s.iter_epoch():
                assert b["tokens"].dtype == torch.int64 and b["tokens"].shape[1] == 256
                assert b["labels"].dtype == torch.int64 and len(b["labels"]) == len(b["tokens"]) <= 32
                seen.update(_ids(b))
                n += 1
            assert n == s.batches_per_epoch(epoch) > 0 and s.epoch == epoch + 1
        assert seen == everything


def test_fewer_shards_than_slots_still_exactly_once(cifar_tokens):
    shards = Manifest.load(cifar_tokens).split("val").shards
    assert len(shards) < 3 * 2  # 3 val shards, 6 slots: shards are cut into interleaved parts
    units = deal_units(shards, cifar_tokens, 6, seed=0, epoch=0)
    assert all(units) and sum(u[3] for slot in units for u in slot) == sum(s.num_samples for s in shards)
    seen: Counter = Counter()
    for rank in range(3):
        s = TokenStream(cifar_tokens, "val", 8, rank=rank, world_size=3, num_workers=2, shuffle_buffer=10)
        for b in s.iter_epoch():
            seen.update(_ids(b))
    assert seen == _all_ids(cifar_tokens, "val")


def _take(stream, n):
    return [b["tokens"] for b in itertools.islice(iter(stream), n)]


def test_deterministic_for_a_seed_and_shuffled(cifar_tokens):
    a = _take(TokenStream(cifar_tokens, "train", 16, seed=1, num_workers=2), 5)
    b = _take(TokenStream(cifar_tokens, "train", 16, seed=1, num_workers=2), 5)
    c = _take(TokenStream(cifar_tokens, "train", 16, seed=2, num_workers=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    ordered = next(iterate_split(cifar_tokens, "train", 16))["tokens"]
    assert not torch.equal(a[0], ordered)
    # epochs differ in order
    s = TokenStream(cifar_tokens, "train", 16, seed=1, num_workers=2)
    first = [i for b in s.iter_epoch() for i in _ids(b)]
    second = [i for b in s.iter_epoch() for i in _ids(b)]
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("num_workers,augment", [(2, False), (0, False), (2, True), (0, True)])
def test_resume_mid_epoch_continues_without_repeats(request, num_workers, augment):
    """With augmentation (flips, random crops of margin shards) too: the resumed batches are bit-identical."""
    cifar_tokens = request.getfixturevalue("cifar_tokens_margin" if augment else "cifar_tokens")
    kw = dict(world_size=2, num_workers=num_workers, seed=3, shuffle_buffer=50, batch_size=24, hflip=augment,
              random_crop=augment)
    full = TokenStream(cifar_tokens, "train", rank=1, **kw)
    per_epoch = full.batches_per_epoch(0)
    reference = [_ids(b) for b in itertools.islice(iter(full), per_epoch + 5)]  # into the second epoch

    run = TokenStream(cifar_tokens, "train", rank=1, **kw)
    cut = per_epoch // 2 + 1
    got = [_ids(b) for b in itertools.islice(iter(run), cut)]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["batches_in_epoch"] == cut == state["total_batches"]

    resumed = TokenStream(cifar_tokens, "train", rank=1, **kw)
    resumed.load_state_dict(state)
    got += [_ids(b) for b in itertools.islice(iter(resumed), per_epoch + 5 - cut)]
    assert got == reference
    epoch0 = [i for b in got[:per_epoch] for i in b]
    assert len(epoch0) == len(set(epoch0))  # no sample repeated within the epoch

    # another rank of the same run derives its own position from the total batches (lockstep ranks)
    r0 = TokenStream(cifar_tokens, "train", rank=0, **kw)
    ref0 = [_ids(b) for b in itertools.islice(iter(r0), cut + 3)]
    other = TokenStream(cifar_tokens, "train", rank=0, **kw)
    other.load_state_dict(state)
    assert [_ids(b) for b in itertools.islice(iter(other), 3)] == ref0[cut:]


def test_resume_with_changed_layout_starts_next_epoch(cifar_tokens):
    s = TokenStream(cifar_tokens, "train", 16, num_workers=2)
    _take(s, 3)
    other = TokenStream(cifar_tokens, "train", 16, num_workers=1)
    with pytest.warns(UserWarning, match="layout changed"):
        other.load_state_dict(s.state_dict())
    assert other.epoch == 1 and other.batches_in_epoch == 0


def test_resampled_mode_is_endless_and_deterministic(cifar_tokens):
    n = Manifest.load(cifar_tokens).split("val").num_samples
    kw = dict(mode="resampled", num_workers=2, seed=4, shuffle_buffer=20)
    s = TokenStream(cifar_tokens, "val", 32, **kw)
    batches = _take(s, 2 * n // 32 + 3)  # well past one epoch's worth
    assert len(batches) == 2 * n // 32 + 3
    again = _take(TokenStream(cifar_tokens, "val", 32, **kw), 4)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    resumed = TokenStream(cifar_tokens, "val", 32, **kw)
    resumed.load_state_dict(s.state_dict())
    assert not torch.equal(_take(resumed, 1)[0], batches[0])  # re-seeded, not replayed
    with pytest.raises(ValueError, match="no epochs"):
        next(s.iter_epoch())


def test_iterate_split_is_ordered_and_complete(cifar_tokens):
    m = Manifest.load(cifar_tokens)
    batches = list(iterate_split(cifar_tokens, "val", 100, with_labels=True))
    assert sum(len(b["tokens"]) for b in batches) == m.split("val").num_samples
    assert [len(b["tokens"]) for b in batches][:-1] == [100] * (len(batches) - 1)
    assert all(0 <= int(b["labels"].min()) and int(b["labels"].max()) < 10 for b in batches)
    assert all(int(b["tokens"].max()) < m.vocab_size for b in batches)


def _with_a_foreign_token(cifar_tokens, out) -> tuple[str, str]:
    """A copy of ``cifar_tokens`` whose second sample of the first val shard holds token 600 (the vocabulary is 512);
    returns (shard file, sample key)."""
    shutil.copytree(cifar_tokens, out)
    shard = out / Manifest.load(out).split("val").shards[0].file
    data = shard.read_bytes()
    members = [(name, data[offset:offset + size]) for name, offset, size in iter_members(data)]
    bad = [name for name, _ in members if name.endswith(".tokens.npy")][1]
    members = [(name, payload[:-2] + np.uint16(600).tobytes() if name == bad else payload) for name, payload in members]
    shard.write_bytes(tar_bytes(members))
    return shard.name, bad.partition(".")[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_token_outside_the_vocabulary_is_refused_in_one_line_naming_the_shard_and_sample(cifar_tokens, tmp_path,
                                                                                         num_workers):
    shard, key = _with_a_foreign_token(cifar_tokens, tmp_path / "tokens")
    with pytest.raises(UserError) as err:
        for _ in TokenStream(tmp_path / "tokens", "val", 16, num_workers=num_workers, shuffle_buffer=4).iter_epoch():
            pass
    message = str(err.value)
    assert shard in message and repr(key) in message and "token 600" in message and "\n" not in message, message
    with pytest.raises(UserError, match=f"{shard}: sample {key!r} holds token 600"):
        list(iterate_split(tmp_path / "tokens", "val", 64))


def test_bad_arguments_are_clear(cifar_tokens, tmp_path):
    with pytest.raises(KeyError, match="not in the manifest"):
        TokenStream(cifar_tokens, "test", 8)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TokenStream(tmp_path, "train", 8)
    with pytest.raises(ValueError, match="rank"):
        TokenStream(cifar_tokens, "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="mode"):
        TokenStream(cifar_tokens, "train", 8, mode="forever")
    (tmp_path / "manifest.json").write_bytes((cifar_tokens / "manifest.json").read_bytes())  # shards not copied
    with pytest.raises(FileNotFoundError, match="shards in the manifest are missing"):
        TokenStream(tmp_path, "train", 8)


def test_32px_fixture(cifar_tokens32):
    b = next(iter(TokenStream(cifar_tokens32, "train", 4, num_workers=0)))
    assert b["tokens"].shape == (4, 1024)


def _keys_of(stream: TokenStream, batches: int | None = None) -> list[str]:
    it = stream.iter_epoch() if batches is None else itertools.islice(iter(stream), batches)
    return [k for b in it for k in b["keys"]]


@pytest.mark.parametrize("old, new", [
    ((2, 2, 16), (1, 2, 16)),  # 2 ranks → 1, same micro-batch (the global batch kept by grad_accum)
    ((1, 2, 16), (2, 2, 16)),
    ((3, 1, 8), (2, 0, 24)),   # workers and batch size change too
])
def test_resplit_on_another_layout_sees_every_sample_of_the_epoch_once(cifar_tokens, old, new):
    (w0, n0, b0), (w1, n1, b1) = old, new
    everything = _all_keys(cifar_tokens)
    ranks = [TokenStream(cifar_tokens, "train", b0, rank=r, world_size=w0, num_workers=n0, seed=7,
                         shuffle_buffer=64, with_keys=True) for r in range(w0)]
    taken = 5  # lockstep batches per rank before the "checkpoint"
    seen = Counter(k for s in ranks for k in _keys_of(s, taken))
    states = [s.state_dict() for s in ranks]
    rest = Counter()
    for r in range(w1):
        s = TokenStream(cifar_tokens, "train", b1, rank=r, world_size=w1, num_workers=n1, seed=7, shuffle_buffer=64,
                        with_keys=True)
        assert "re-split" in s.resume_from(states)
        assert s.epoch == 0
        rest.update(_keys_of(s))
        assert s.epoch == 1 and not s.excluded
    assert max((seen + rest).values()) == 1  # nothing twice within the epoch
    assert seen + rest == everything  # and nothing skipped


def test_resplit_when_a_rank_had_begun_the_next_epoch(cifar_tokens):
    ranks = [TokenStream(cifar_tokens, "train", 32, rank=r, world_size=2, num_workers=1, seed=3, shuffle_buffer=32,
                         with_keys=True) for r in range(2)]
    per_epoch = [s.batches_per_epoch(0) for s in ranks]
    ahead = int(np.argmin(per_epoch))
    assert per_epoch[0] != per_epoch[1]  # whole shards per slot: the ranks' epochs differ in length
    taken = min(per_epoch) + 1  # the shorter rank has begun epoch 1
    seen = [Counter(), Counter()]  # per epoch
    for s in ranks:
        for b in itertools.islice(iter(s), taken):
            seen[s.epoch].update(b["keys"])
    assert ranks[ahead].epoch == 1 and ranks[1 - ahead].epoch == 0
    resumed = TokenStream(cifar_tokens, "train", 32, world_size=1, num_workers=2, seed=3, shuffle_buffer=32,
                          with_keys=True)
    resumed.resume_from([s.state_dict() for s in ranks])
    everything = _all_keys(cifar_tokens)
    for epoch in (0, 1):
        rest = Counter(_keys_of(resumed))
        assert max((seen[epoch] + rest).values()) == 1 and seen[epoch] + rest == everything, epoch


def _all_keys(data_dir) -> Counter:
    s = TokenStream(data_dir, "train", 256, num_workers=0, with_keys=True)
    return Counter(_keys_of(s))
