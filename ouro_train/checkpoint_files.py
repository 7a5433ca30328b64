"""Reading checkpoint files without trusting them: no code runs from a file, and a damaged file is named.

Every `torch.load` of a checkpoint file, ours and DeepSpeed's (its engine, universal loader and
converter, and `zero_to_fp32` all call `torch.load(..., weights_only=False)`), runs inside
`weights_only_loads()`: `torch.load` is then `weights_only=True` with an allow-list of the few non-tensor
types these files hold, so a pickle that would import or call anything else is refused, naming the
file, before any of it runs. A truncated or corrupt file is named too, instead of a bare zip-reader
error. `damaged_file` checks a checkpoint's files without reading their tensors (each `.pt` is a zip
archive whose directory is at its end: a truncated file has none, or members reaching past the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used; the message names it."""


class UnsafeCheckpointFile(CheckpointFileError):
    """A file whose pickle needs more than the allow-listed types: it is never unpickled."""


class DamagedCheckpointFile(CheckpointFileError):
    """A truncated or corrupt file."""


def _allowed_globals() -> list:
    """What DeepSpeed's checkpoint files (module, ZeRO optimizer and universal states) and our per-rank
    file (numpy's RNG state) hold besides tensors, containers and numbers: plain data classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            np.ndarray, np.dtype, numpy_reconstruct, type(np.dtype(np.uint32))]


_depth = 0  # nesting of weights_only_loads()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every `torch.load` (ours and DeepSpeed's) is weights-only and names the file it fails on."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    original = torch.load
    allowed = _allowed_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0]
            if "Weights only load failed" in first:
                reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                              first)
                raise UnsafeCheckpointFile(
                    f"{f}: refused to load: it needs more than tensors and plain data ({reason}); a checkpoint "
                    "that asks to run code is not loaded") from None
            raise DamagedCheckpointFile(f"{f}: corrupt ({first})") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
            message = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            if isinstance(e, RuntimeError) and not any(
                    word in message for word in ("PytorchStreamReader", "zip archive", "corrupt", "truncated")):
                raise
            raise DamagedCheckpointFile(f"{f}: truncated or corrupt ({message})") from None

    torch.load, _depth = load, 1
    try:
        yield
    finally:
        torch.load, _depth = original, 0


def load(path: Path, **kwargs):
    """`torch.load` of one checkpoint file, weights-only (see the module docstring)."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", **kwargs)


def damaged_file(checkpoint: Path) -> str | None:
    """What is wrong with `checkpoint`'s files (the first damaged one, named), or None. Reads each
    `.pt` file's zip directory, not its tensors."""
    for path in sorted(checkpoint.rglob("*.pt")):
        if any(part.endswith(".tmp") for part in path.relative_to(checkpoint).parts):
            continue  # an unfinished universal conversion: never read
        problem = _zip_problem(path)
        if problem:
            return f"{path} is truncated or corrupt ({problem})"
    for path in sorted(checkpoint.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"{path} is truncated or corrupt ({e})"
    return None


def _zip_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                local_header = 30 + len(member.filename.encode())  # at least: its extra field may pad it
                if member.header_offset + local_header + member.compress_size > size:
                    return f"{member.filename} reaches past its end at {size} bytes"
    except (zipfile.BadZipFile, OSError) as e:
        return str(e)
    return None


def fsync(path: Path) -> None:
    """`path` (a file, or a directory: its entries) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path` and the directories holding them: on disk before a COMPLETE marker says so."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync(Path(root, name))
        fsync(Path(root))
