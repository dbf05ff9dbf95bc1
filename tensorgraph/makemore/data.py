"""Names data: loading, the character vocabulary, and the lecture's seeded 80/10/10 split."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

BLOCK_SIZE = 3  # context length: how many characters predict the next one
SPLIT_SEED = 42  # the lecture's random.seed(42) shuffle


class DataError(ValueError):
    """A data file that cannot be used, with the file and line that are wrong."""


def default_path() -> Path:
    """The embedded names.txt (32,033 names; MIT, from Andrej Karpathy's makemore)."""
    return Path(str(resources.files("tensorgraph") / "data" / "names.txt"))


def load_words(path: str | Path | None = None) -> list[str]:
    """One word per line; blank lines are skipped. Errors name the file and line."""
    path = Path(path) if path is not None else default_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data file is a directory: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Notepad's) is not a character of the first word
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text") from None
    words = []
    for number, line in enumerate(text.splitlines(), start=1):
        word = line.strip()
        if not word:
            continue
        if any(ch.isspace() for ch in word):
            raise DataError(f"{path}:{number}: expected one word per line, got {line!r}")
        if "." in word:
            raise DataError(f"{path}:{number}: '.' is reserved as the start/end token, found in {word!r}")
        words.append(word)
    if not words:
        raise DataError(f"data file is empty: {path}")
    return words


def data_checksum(path: str | Path | None = None) -> str:
    """sha256 of the data file's bytes (the embedded names.txt when None): which data a checkpoint was trained on."""
    path = Path(path) if path is not None else default_path()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None


@dataclass(frozen=True)
class Vocab:
    """Characters <-> integers; '.' (index 0) marks the start and end of a word."""

    itos: dict[int, str]

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        chars = sorted(set("".join(words)))
        itos = {i + 1: ch for i, ch in enumerate(chars)}
        itos[0] = "."
        return cls(itos)

    @property
    def stoi(self) -> dict[str, int]:
        return {ch: i for i, ch in self.itos.items()}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, word: str) -> list[int]:
        stoi = self.stoi
        return [stoi[ch] for ch in word]

    def decode(self, indices: list[int]) -> str:
        return "".join(self.itos[i] for i in indices)


def build_dataset(words: list[str], vocab: Vocab, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, as the lecture builds them."""
    stoi = vocab.stoi
    xs, ys = [], []
    for word in words:
        context = [0] * block_size
        for ch in word + ".":
            ix = stoi[ch]
            xs.append(context)
            ys.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(xs, dtype=torch.long).view(-1, block_size), torch.tensor(ys, dtype=torch.long)


@dataclass
class Splits:
    """The lecture's train / val / test tensors and the vocabulary."""

    vocab: Vocab
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    block_size: int


def load_splits(path: str | Path | None = None, block_size: int = BLOCK_SIZE, seed: int = SPLIT_SEED) -> Splits:
    """Shuffle with ``random.seed(42)`` and split 80/10/10, exactly as the lecture does."""
    words = load_words(path)
    vocab = Vocab.from_words(words)
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return Splits(
        vocab,
        build_dataset(words[:n1], vocab, block_size),
        build_dataset(words[n1:n2], vocab, block_size),
        build_dataset(words[n2:], vocab, block_size),
        block_size,
    )
