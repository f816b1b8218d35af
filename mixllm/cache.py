"""The disk cache of quantization results: salience, per-block results of the block-by-block pass
(which is what lets a killed run resume), one-pass quantizer results.

An entry is a directory ``root/<key>/`` of safetensors files. ``key`` is a hash of everything the
results depend on (:func:`fingerprint`: layer names, weights with their dtype, calibration tokens,
the settings passed in). Every file is written to a temporary name in the same directory and renamed
(atomic on POSIX), so a reader sees a whole file or none; temporaries left by a killed writer are
removed when the entry is opened. A damaged file is ignored (recomputed), never trusted.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Dict, Iterable, Optional, Tuple

import torch

__all__ = ["DiskCache", "fingerprint", "derive_key"]

_VERSION = 2  # bump when the meaning of cached results changes


def fingerprint(layers: Iterable[Tuple[str, torch.nn.Module]], ids: Optional[torch.Tensor], *settings) -> str:
    """Hex key of the layers' names and weights (raw bytes and dtype), the token ids and ``settings``
    (anything with a stable ``repr``)."""
    h = hashlib.blake2b(digest_size=16)
    for n, m in layers:
        w = m.weight.detach()
        h.update(f"{n}:{w.dtype}:{tuple(w.shape)}".encode())
        t = w.contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    if ids is not None:
        h.update(ids.detach().cpu().long().contiguous().numpy().tobytes())
    h.update(repr((_VERSION,) + tuple(settings)).encode())
    return h.hexdigest()


def derive_key(base: str, *settings) -> str:
    """The key of results that depend on ``base`` (a :func:`fingerprint`) and ``settings``."""
    return hashlib.blake2b(repr((base, _VERSION) + tuple(settings)).encode(), digest_size=16).hexdigest()


class DiskCache:
    """One cache entry, ``root/key/``."""

    def __init__(self, root, key: str):
        self.dir = pathlib.Path(os.path.expanduser(str(root))) / key
        if self.dir.is_dir():
            for f in self.dir.glob(".*.tmp*"):  # a writer killed between write and rename
                try:
                    f.unlink()
                except OSError:
                    pass

    def path(self, fname: str) -> pathlib.Path:
        return self.dir / fname

    def read(self, fname: str) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = self.dir / fname
        if not f.exists():
            return {}
        try:
            return load_file(str(f))
        except Exception:  # a damaged entry is recomputed, never trusted
            return {}

    def write(self, fname: str, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.tmp", dir=self.dir)
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / fname)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
