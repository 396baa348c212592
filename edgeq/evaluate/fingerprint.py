"""The data fingerprint of a validation record: sha256 of the samples in blocks of `BLOCK`, whatever the chunks they
came in, so every data shard hashes its own blocks and the merged fingerprint is the one a single process computes.

Hashing is done on the data as given, before the cast to the model's input dtypes, so an FP16 model with float16
inputs and its FP32 base get the same fingerprint on the same data.

>>> import numpy as np
>>> whole, halves = Fingerprint(), Fingerprint()
>>> x = np.arange(600, dtype=np.float32)
>>> whole.add({"x": x})
>>> halves.add({"x": x[:100]}); halves.add({"x": x[100:]})
>>> whole.hexdigest() == halves.hexdigest() == combined([whole.blocks]).removeprefix("sha256:")
True
"""
from __future__ import annotations

import hashlib

import numpy as np

BLOCK = 256   # samples per hashed block: data shards start on multiples of it


class Fingerprint:
    """Block digests of the samples from `start` on (a multiple of BLOCK)."""

    def __init__(self, start: int = 0) -> None:
        self.position = start
        self.blocks: dict[int, bytes] = {}
        self._open: dict[str, tuple[list[str], "hashlib._Hash"]] = {}
        self._block = start // BLOCK

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Samples with the sample axis first (inputs and labels), in stream order."""
        size = len(next(iter(arrays.values()))) if arrays else 0
        offset = 0
        while offset < size:
            take = min(size - offset, BLOCK - self.position % BLOCK)
            for key in sorted(arrays):
                part = np.ascontiguousarray(arrays[key][offset:offset + take])
                shapes, digest = self._open.setdefault(key, ([], hashlib.sha256()))
                header = f"{part.dtype.str}{part.shape[1:]}"
                if not shapes or shapes[-1] != header:
                    shapes.append(header)
                digest.update(part)  # the array's own buffer: no copy of a large chunk
            offset += take
            self.position += take
            if self.position % BLOCK == 0:
                self._close()

    def _close(self) -> None:
        if self._open:
            whole = hashlib.sha256()
            for key in sorted(self._open):
                shapes, digest = self._open[key]
                whole.update(f"{key}:{','.join(shapes)}:".encode() + digest.digest())
            self.blocks[self._block] = whole.digest()
        self._open, self._block = {}, self.position // BLOCK

    def finish(self) -> dict[int, bytes]:
        """Every block's digest, the last (partial) one closed."""
        self._close()
        return self.blocks

    def hexdigest(self) -> str:
        return combined([self.finish()]).removeprefix("sha256:")


def combined(parts: list[dict[int, bytes]]) -> str:
    """The fingerprint of the blocks of every shard, in order."""
    blocks = {index: digest for part in parts for index, digest in part.items()}
    return "sha256:" + hashlib.sha256(b"".join(blocks[i] for i in sorted(blocks))).hexdigest()
