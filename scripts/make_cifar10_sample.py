"""Writes tests/data/cifar10-sample.tar.gz: the first 4,000 samples of ../shared's CIFAR-10 train shards.

Made once (the tests read only the sample, so they run in any clone): the same JPEG and ``.cls``
members, byte for byte, as a gzipped raw-image WebDataset tar. Deterministic output.

    python scripts/make_cifar10_sample.py [SHARED_TAR] [COUNT]
"""
from __future__ import annotations

import gzip
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from igpt.data_pipeline.tario import tar_bytes  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "cifar10-train" / "cifar10-train-000000.tar"
OUT = REPO / "tests" / "data" / "cifar10-sample.tar.gz"


def main(source: Path = SOURCE, count: int = 4000) -> None:
    members: list[tuple[str, bytes]] = []
    keys: set[str] = set()
    with tarfile.open(source) as tf:
        for m in tf:
            key = m.name.rsplit(".", 1)[0]
            if key not in keys and len(keys) == count:
                break
            keys.add(key)
            members.append((m.name, tf.extractfile(m).read()))
    OUT.write_bytes(gzip.compress(tar_bytes(members), compresslevel=9, mtime=0))
    print(f"{OUT}: {len(keys)} samples, {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE, int(sys.argv[2]) if len(sys.argv) > 2 else 4000)
