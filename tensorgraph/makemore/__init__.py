"""The lecture's character-level MLP ("makemore"): data, model, training and sampling.

    from tensorgraph.makemore import load_splits, TrainConfig, train
    result = train(load_splits(), TrainConfig(steps=20_000))   # every gradient from graph.backward
"""

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .data import DataError, Splits, Vocab, build_dataset, load_splits, load_words
from .model import MLP, forward
from .train import (
    BACKENDS,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    TrainState,
    extend_config,
    record_step,
    state_from_checkpoint,
    train,
)

__all__ = [
    "BACKENDS", "CheckpointError", "DataError", "MLP", "Splits", "TrainConfig", "TrainResult", "TrainState",
    "TrainingDiverged", "TrainingInterrupted", "Vocab", "build_dataset", "extend_config", "forward", "load_checkpoint",
    "load_splits", "load_words", "model_from_checkpoint", "record_step", "state_from_checkpoint", "train",
]
