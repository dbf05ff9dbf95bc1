"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``, verified by checksum.

A checkpoint is a plain dict of tensors, strings and numbers: the parameters, the
calibrated batchnorm statistics, the vocabulary, the training configuration, and enough of
the training state (step, generator state, per-step losses, evaluations) for ``--resume``
to continue the very same trajectory. It is written to a temporary file in the target's
folder and then renamed over the target, so an interrupted save never leaves a corrupt file.
It carries the sha256 of everything else in it (format version 2), so a file damaged later
(a flipped byte in a tensor) is refused instead of loading different numbers.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .data import Vocab
from .model import MLP, PARAMETER_NAMES

FORMAT = "tensorgraph.makemore"
VERSION = 2  # 2: a "checksum" entry; version 1 (no checksum) still loads, unverified
READABLE_VERSIONS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupt, not a tensorgraph makemore checkpoint, or unwritable."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace`` it into place.

    A write that fails (a full disk, a folder that went read-only) raises :class:`CheckpointError`
    naming ``path``; the file that was there before is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write the checkpoint {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() would have given
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) or _is_write_failure(err):
            raise CheckpointError(f"cannot write the checkpoint {path}: {_write_failure(err)}") from None
        raise
    return path


def _is_write_failure(err: BaseException) -> bool:
    """torch.save's zip writer reports a failed write as a RuntimeError from its C++ side."""
    return isinstance(err, RuntimeError) and ("inline_container" in str(err) or "PytorchStreamWriter" in str(err))


def _write_failure(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return "the write failed part-way (is the disk full?)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def vocab_to_string(vocab: Vocab) -> str:
    return "".join(vocab.itos[i] for i in range(len(vocab)))


def vocab_from_string(chars: str) -> Vocab:
    return Vocab(dict(enumerate(chars)))


def make_checkpoint(model: MLP, vocab: Vocab, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of a model and its vocabulary, plus training state in ``extra``, with its checksum."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "params": {name: p.detach().clone() for name, p in model.named_parameters().items()},
        "bnmean": model.bnmean,
        "bnvar": model.bnvar,
        "block_size": model.block_size,
        "vocab": vocab_to_string(vocab),
        **extra,
    }
    data["checksum"] = checksum(data)
    return data


def checksum(data: dict[str, Any]) -> str:
    """sha256 over every entry of a checkpoint but ``checksum``: keys, values, tensors' dtype, shape and bytes."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in data.items() if key != "checksum"})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` unambiguously: a type tag, then its contents (dicts in key order)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float, bool, None: repr is exact and delimited
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def is_verified(data: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint carried a checksum (version 1 files have none: they load unverified)."""
    return "checksum" in data


def unverified_note(data: dict[str, Any], path: str | Path) -> str | None:
    """The note to show for a checkpoint loaded without a checksum, or None."""
    if is_verified(data):
        return None
    return (f"note: {path} was written by an older tensorgraph (checkpoint format version {data.get('version')}) "
            f"and has no checksum; it is loaded without verification")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; errors name the file and what is wrong with it.

    Version 2 checkpoints must match the sha256 stored in them; version 1 ones (no checksum)
    load unverified (:func:`unverified_note`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.errno != errno.EINVAL:  # torch reports reading past the end of a truncated file as EINVAL
            raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
        raise _unreadable(path, _load_failure(err)) from None
    except Exception as err:  # noqa: BLE001 - garbage makes torch.load fail in many ways (IndexError, OSError ...)
        raise _unreadable(path, _load_failure(err)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"not a tensorgraph makemore checkpoint: {path}")
    if data.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('version')!r} is not supported "
                              f"(this tensorgraph reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    _verify(data, path)
    _validate(data, path)
    return data


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a tensorgraph checkpoint, or it is truncated/corrupt ({reason})")


def _load_failure(err: BaseException) -> str:
    """A short reason for torch.load's failure (its own messages run to paragraphs, some misleading)."""
    text = str(err).strip()
    if "Weights only load failed" in text:  # the text after it is advice about PyTorch 2.6, not about the file
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].strip() if detail and "WeightsUnpickler error:" in text else ""
        if detail.startswith("Unsupported global"):
            return f"it holds Python objects, which torch.load(weights_only=True) refuses: {detail.split('.')[0]}"
        return f"torch.load(weights_only=True): {detail[:100] or 'not a pickle it can read'}"
    if "central directory" in text or "zip archive" in text or isinstance(err, OSError):
        return "not a complete zip archive as torch.save writes"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"torch.load: {first[:120]}"


def _verify(data: dict[str, Any], path: Path) -> None:
    if data["version"] >= 2 and not isinstance(data.get("checksum"), str):
        raise _unreadable(path, "its checksum is missing")
    if "checksum" in data and checksum(data) != data["checksum"]:
        raise _unreadable(path, "its contents do not match the sha256 checksum saved with it")


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
    _validate_finite(data, path)
    if "generator" in data:
        _validate_generator(data["generator"], path)


def _validate_finite(data: dict[str, Any], path: Path) -> None:
    tensors = {**data["params"], "bnmean": data.get("bnmean"), "bnvar": data.get("bnvar")}
    bad = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: the checkpoint's {', '.join(bad)} hold non-finite values (nan or inf): the "
                              f"run that wrote it diverged; train again with a smaller --lr")


def _validate_generator(state: Any, path: Path) -> None:
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _unreadable(path, f"its generator state is invalid: {reason[:100]}") from None


def model_from_checkpoint(data: dict[str, Any]) -> tuple[MLP, Vocab]:
    """The model (parameters and calibrated statistics) and vocabulary stored in a checkpoint."""
    params = data["params"]
    model = MLP(*(params[name].clone() for name in PARAMETER_NAMES), block_size=data["block_size"],
                bnmean=data.get("bnmean"), bnvar=data.get("bnvar"))
    return model, vocab_from_string(data["vocab"])
