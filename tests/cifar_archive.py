"""Test helpers: a CIFAR-10 binary archive made from the shipped sample, and a local HTTP server for it.

The archive has the official layout (``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``,
``batches.meta.txt``; records of 1 label byte + R, G, B planes). The server answers on 127.0.0.1,
understands ``Range: bytes=N-`` (unless told not to) and can drop the connection part-way through.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sample_images(sample_tar: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (n, 32, 32, 3) uint8 and labels (n,) of a raw-image WebDataset tar."""
    images, labels = {}, {}
    with tarfile.open(sample_tar) as tf:
        for m in tf:
            key, ext = m.name.rsplit(".", 1)
            data = tf.extractfile(m).read()
            if ext == "jpg":
                images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            else:
                labels[key] = int(data)
            if len(labels) == n:
                break
    keys = [k for k in images if k in labels][:n]
    return np.stack([images[k] for k in keys]), np.array([labels[k] for k in keys])


def records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: label byte, then the R, G and B planes of each image."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], 1).tobytes()


def write_archive(path: Path, images: np.ndarray, labels: np.ndarray, test_images: int = 10) -> str:
    """A cifar-10-binary.tar.gz: the images split over five training batches, then a small test batch
    of the first ``test_images`` (which must not end up in the training tars); returns its md5."""
    members = {}
    for i, idx in enumerate(np.array_split(np.arange(len(images)), 5), 1):
        members[f"data_batch_{i}.bin"] = records(images[idx], labels[idx])
    members["test_batch.bin"] = records(255 - images[:test_images], labels[:test_images])
    members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass
class ArchiveServer:
    """Serves ``payload`` at ``http://127.0.0.1:PORT/cifar-10-binary.tar.gz``; records each request's Range."""

    payload: bytes
    ranges: bool = True
    cut_after: int | None = None  # the first response stops after this many body bytes
    requests: list[str | None] = field(default_factory=list)

    def __enter__(self) -> "ArchiveServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and server.ranges else 0
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None and len(server.requests) == 1:
                    body = body[: server.cut_after]
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/cifar-10-binary.tar.gz"

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
