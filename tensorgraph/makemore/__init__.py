"""The lecture's character-level MLP ("makemore"): data, model, training and sampling.

    from tensorgraph.makemore import load_splits, TrainConfig, train
    result = train(load_splits(), TrainConfig(steps=20_000))   # every gradient from graph.backward
"""

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import DataError, Splits, Vocab, build_dataset, load_splits, load_words
from .model import MLP, forward
from .train import (
    BACKENDS,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    TrainState,
    record_step,
    train,
)

__all__ = [
    "BACKENDS", "DataError", "MLP", "Splits", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged",
    "TrainingInterrupted", "Vocab", "build_dataset", "forward", "load_checkpoint", "load_splits", "load_words",
    "model_from_checkpoint", "record_step", "train",
]
