"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, strings and numbers: the parameters, the
calibrated batchnorm statistics, the vocabulary, the training configuration, and enough of
the training state (step, generator state, per-step losses, evaluations) for ``--resume``
to continue the very same trajectory. It is written to a temporary file in the target's
folder and then renamed over the target, so an interrupted save never leaves a corrupt file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .data import Vocab
from .model import MLP, PARAMETER_NAMES

FORMAT = "tensorgraph.makemore"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not a tensorgraph makemore checkpoint."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() would have given
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def vocab_to_string(vocab: Vocab) -> str:
    return "".join(vocab.itos[i] for i in range(len(vocab)))


def vocab_from_string(chars: str) -> Vocab:
    return Vocab(dict(enumerate(chars)))


def make_checkpoint(model: MLP, vocab: Vocab, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of a model and its vocabulary, plus training state in ``extra``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "params": {name: p.detach().clone() for name, p in model.named_parameters().items()},
        "bnmean": model.bnmean,
        "bnvar": model.bnvar,
        "block_size": model.block_size,
        "vocab": vocab_to_string(vocab),
        **extra,
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - garbage makes torch.load fail in many ways (IndexError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"not a tensorgraph checkpoint (torch.load with weights_only=True cannot read "
                              f"it): {path}: {reason[:160]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"not a tensorgraph makemore checkpoint: {path}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('version')!r} is not supported "
                              f"(this tensorgraph reads version {VERSION})")
    _validate(data, path)
    return data


def _validate(data: dict[str, Any], path: Path) -> None:
    params = data.get("params")
    if not isinstance(params, dict) or set(params) != set(PARAMETER_NAMES):
        raise CheckpointError(f"{path}: checkpoint parameters are incomplete (expected {', '.join(PARAMETER_NAMES)})")
    vocab = data.get("vocab")
    if not isinstance(vocab, str) or not vocab or vocab[0] != ".":
        raise CheckpointError(f"{path}: checkpoint has no valid vocabulary")
    C, W1, W2 = params["C"], params["W1"], params["W2"]
    block = data.get("block_size")
    expected = {"C": (len(vocab), C.shape[1] if C.dim() == 2 else -1)}
    if C.dim() == 2 and isinstance(block, int) and W1.dim() == 2:
        n_embd, n_hidden = C.shape[1], W1.shape[1]
        expected.update({"W1": (n_embd * block, n_hidden), "b1": (n_hidden,), "W2": (n_hidden, len(vocab)),
                         "b2": (len(vocab),), "bngain": (1, n_hidden), "bnbias": (1, n_hidden)})
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise CheckpointError(f"{path}: parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")
    if len(expected) == 1 or W2.dim() != 2:
        raise CheckpointError(f"{path}: checkpoint parameters have inconsistent shapes")


def model_from_checkpoint(data: dict[str, Any]) -> tuple[MLP, Vocab]:
    """The model (parameters and calibrated statistics) and vocabulary stored in a checkpoint."""
    params = data["params"]
    model = MLP(*(params[name].clone() for name in PARAMETER_NAMES), block_size=data["block_size"],
                bnmean=data.get("bnmean"), bnvar=data.get("bnvar"))
    return model, vocab_from_string(data["vocab"])
