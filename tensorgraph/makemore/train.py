"""Training the lecture's MLP: the backends, the SGD loop, evaluation, and the run's outputs.

One loop serves every caller (the CLI, the demo, the examples)::

    splits = load_splits()
    result = train(splits, TrainConfig(steps=20_000), backend="engine")
    print(result.train_loss, result.val_loss)

A backend turns the model into a step function ``step(Xb, Yb) -> (loss, grads)`` with the
gradients in parameter order. ``engine`` records the forward with ``tg.record()`` and takes
the gradients from ``graph.backward``; ``torch`` runs the same forward under torch
autograd; ``compiled`` hands it to ``tg.compile``. Adding a backend is one entry in
:data:`BACKENDS`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..graph import Graph
from ..record import record
from .checkpoint import CheckpointError, make_checkpoint, model_from_checkpoint, save_atomic
from .data import Splits, Vocab
from .model import MLP, forward

SEED = 2147483647

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, list[Tensor]]]


class TrainError(ValueError):
    """A training run that cannot start or finish (bad configuration, unavailable backend, mismatched data,
    divergence, an output that cannot be written)."""


class TrainingInterrupted(Exception):
    """Ctrl-C (or a callback raising KeyboardInterrupt) stopped training.

    ``state`` is the state at the last finished step; ``path`` the checkpoint saved (None when
    none was); ``result`` the finished run's result when the interrupt came after the last step.
    """

    def __init__(self, state: TrainState, path: Path | None, *, why_not: str | None = None,
                 result: TrainResult | None = None) -> None:
        if result is not None:
            where = f"the finished run is saved to {path}" if path else "no checkpoint saved"
            message = f"training interrupted after its last step ({state.step:,}); {where}"
        else:
            where = f"checkpoint saved to {path} (continue with --resume {path})" if path else "no checkpoint saved"
            message = f"training interrupted at step {state.step:,}; {where}"
        super().__init__(message + (f" ({why_not})" if why_not and not path else ""))
        self.state = state
        self.path = path
        self.result = result


class TrainingDiverged(TrainError):
    """A batch loss (or the final loss) that is not finite: the run diverged; nothing is saved."""

    def __init__(self, step: int, loss: float, lr: float, final: bool = False) -> None:
        when = f"after its last step ({step:,})" if final else f"at step {step:,}"
        super().__init__(f"training diverged {when}: its loss is {loss}; try a smaller learning rate (--lr; this "
                         f"run's is {lr:g}); no checkpoint was written for it")
        self.step = step


# ---------------------------------------------------------------- configuration and state


@dataclass
class TrainConfig:
    """Hyperparameters; the defaults are the lecture's exercise 4."""

    steps: int = 200_000
    batch_size: int = 32
    n_embd: int = 10
    n_hidden: int = 200
    lr: float = 0.1
    lr_decay_step: int | None = None  # None: half-way (the lecture: 100,000 of 200,000)
    lr_final: float | None = None  # None: lr / 10 (the lecture: 0.01)
    seed: int = SEED
    eval_every: int | None = None  # None: steps // 10, at least 5,000; full train/val losses for the curve

    def resolved(self) -> TrainConfig:
        """The configuration with every default filled in, checked."""
        config = replace(
            self,
            lr_decay_step=self.steps // 2 if self.lr_decay_step is None else self.lr_decay_step,
            lr_final=self.lr / 10 if self.lr_final is None else self.lr_final,
            eval_every=max(5_000, self.steps // 10) if self.eval_every is None else self.eval_every,
        )
        config.check()
        return config

    def check(self) -> None:
        for name in ("steps", "n_embd", "n_hidden"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                     f"{name} must be a positive integer, got {getattr(self, name)!r}")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 2,
                 f"batch_size must be at least 2 (batchnorm's variance needs two examples), got {self.batch_size!r}")
        for name in ("lr", "lr_final"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value > 0),
                     f"{name} must be a positive number, got {value!r}")
        _require(self.lr_decay_step is None or self.lr_decay_step >= 0,
                 f"lr_decay_step must be >= 0, got {self.lr_decay_step!r}")
        _require(self.eval_every is None or self.eval_every > 0,
                 f"eval_every must be positive, got {self.eval_every!r}")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 f"seed must be in [0, 2**63), got {self.seed!r}")

    def learning_rate(self, step: int) -> float:
        """The lecture's schedule: ``lr`` until ``lr_decay_step``, then ``lr_final``."""
        decay = self.steps // 2 if self.lr_decay_step is None else self.lr_decay_step
        return self.lr if step < decay else (self.lr / 10 if self.lr_final is None else self.lr_final)


def extend_config(config: TrainConfig, state: TrainState, steps: int) -> tuple[TrainConfig, str | None]:
    """A resumed run's configuration with ``steps`` in total, and a note on its learning-rate decay (or None).

    A decay at half-way (the default) that has not happened yet moves to half-way of the new
    total, so the run goes on as a run of that length would have gone (bit for bit, unless the
    new half-way lies behind the step resumed from: then the rate drops at once). One that
    already happened stays where it was: the rate does not go back up. A decay step set
    explicitly (not half-way) stays. The evaluations' default spacing follows the new total.
    """
    old_steps = config.steps
    config = replace(config, steps=steps)
    if config.eval_every == max(5_000, old_steps // 10):
        config.eval_every = max(5_000, steps // 10)
    decay = config.lr_decay_step
    if decay is None or decay != old_steps // 2:
        return config, None
    if state.step < decay:
        config.lr_decay_step = steps // 2
        return config, (f"the learning rate decays at step {steps // 2:,}, half-way of the new {steps:,} steps "
                        f"(it was {decay:,}, half-way of {old_steps:,})")
    return config, (f"the learning rate already decayed at step {decay:,} (half-way of the first {old_steps:,} "
                    f"steps); it stays at {config.learning_rate(decay):g}, unlike a {steps:,}-step run's, which "
                    f"decays at {steps // 2:,}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TrainError(message)


@dataclass
class TrainState:
    """Everything that changes during training; with the config, enough to resume exactly."""

    model: MLP
    generator: torch.Generator  # the batches' generator (it also drew the initial parameters)
    step: int = 0
    losses: list[float] = field(default_factory=list)  # the batch loss of every step
    history: list[dict[str, float]] = field(default_factory=list)  # periodic full train/val losses
    seconds: float = 0.0  # wall time spent training, over all resumes
    updating: bool = field(default=False, repr=False)  # inside the parameter update: not a state to save


def init_state(config: TrainConfig, vocab_size: int, block_size: int) -> TrainState:
    """A fresh model drawn from a generator seeded with ``config.seed``; the batches continue that generator."""
    generator = torch.Generator().manual_seed(config.seed)
    model = MLP.init(vocab_size, block_size=block_size, n_embd=config.n_embd, n_hidden=config.n_hidden,
                     generator=generator)
    return TrainState(model, generator)


# ---------------------------------------------------------------- backends


def record_step(model: MLP, Xb: Tensor, Yb: Tensor, **options: Any) -> tuple[Graph, Tensor]:
    """One training forward pass recorded as a graph: (graph, loss); ``options`` go to ``tg.record``."""
    C, W1, b1, W2, b2, bngain, bnbias = model.parameters()
    with record(**options) as graph:
        loss = forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)
    return graph, loss


def engine_backend(model: MLP) -> StepFn:
    """Record each step with ``tg.record()`` and take the gradients from ``graph.backward``.

    The loop looks at no name and updates the parameters only after the backward, so it records
    with ``names=False, check_leaves=False`` (the same gradients, ~0.3 of a torch step less).
    """
    params = model.parameters()

    def step(Xb: Tensor, Yb: Tensor) -> tuple[Tensor, list[Tensor]]:
        graph, loss = record_step(model, Xb, Yb, names=False, check_leaves=False)
        grads = graph.backward(loss)
        return loss, [grads[p] for p in params]

    return step


def torch_backend(model: MLP) -> StepFn:
    """The same forward under torch autograd (leaves share the parameters' memory)."""
    params = model.parameters()

    def step(Xb: Tensor, Yb: Tensor) -> tuple[Tensor, list[Tensor]]:
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            loss = forward(*leaves, Xb, Yb)
            grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), list(grads)

    return step


def compiled_backend(model: MLP) -> StepFn:
    """``tg.compile`` of the same forward (tensorgraph/compiler.py)."""
    try:
        from ..compiler import compile as tg_compile
    except ModuleNotFoundError as err:
        if err.name != "tensorgraph.compiler":
            raise
        raise TrainError("backend 'compiled' is not available yet: tensorgraph.compiler (tg.compile) is not "
                         "installed; use --backend engine or torch") from None
    params = model.parameters()
    C, W1, b1, W2, b2, bngain, bnbias = params

    def training_step(Xb: Tensor, Yb: Tensor) -> Tensor:
        return forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)

    # fuse=False: for this forward the fused rules never win (tg.compile keeps the atomic step, which makes
    # fewer torch calls), but deriving them costs 1.5-3 s of sympy at every start: the same losses without it
    compiled = tg_compile(training_step, params=params, fuse=False)

    def step(Xb: Tensor, Yb: Tensor) -> tuple[Tensor, list[Tensor]]:
        loss, grads = compiled(Xb, Yb)
        return loss, [grads[p] for p in params]

    return step


BACKENDS: dict[str, Callable[[MLP], StepFn]] = {
    "engine": engine_backend,
    "torch": torch_backend,
    "compiled": compiled_backend,
}


def make_step(backend: str, model: MLP) -> StepFn:
    if backend not in BACKENDS:
        raise TrainError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[backend](model)


# ---------------------------------------------------------------- evaluation


def split_losses(model: MLP, splits: Splits, names: tuple[str, ...] = ("train", "val")) -> dict[str, float]:
    """Calibrate batchnorm over the training set, then the mean loss of each named split."""
    losses = {"train": model.calibrate(*splits.train)}
    return {name: losses[name] if name in losses else model.evaluate(*getattr(splits, name)) for name in names}


def check_splits(splits: Splits, source: str = "the data") -> None:
    """Training needs a non-empty train and validation split."""
    _require(isinstance(splits, Splits), f"expected the Splits that load_splits(path) returns, not "
                                         f"{type(splits).__name__} (a file name goes to load_splits)")
    for name in ("train", "val"):
        if getattr(splits, name)[0].shape[0] == 0:
            raise TrainError(f"{source}: too few words for the 80/10/10 split (the {name} split is empty); "
                             f"use a file with at least 10 words")


# ---------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """The outcome of :func:`train`: final losses, the state (model included), timing."""

    config: TrainConfig
    state: TrainState
    backend: str
    train_loss: float
    val_loss: float
    seconds: float  # wall time of the training steps and evaluations (all resumes)
    vocab: Vocab
    step_seconds: float = 0.0  # this call's wall time in the training steps alone (no evaluation, no start-up)
    session_steps: int = 0  # the steps this call trained (fewer than ``steps`` when resumed)

    @property
    def steps_per_second(self) -> float:
        """This call's training speed: its steps over the time spent in them (evaluations excluded)."""
        return self.session_steps / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def model(self) -> MLP:
        return self.state.model

    @property
    def steps(self) -> int:
        return self.state.step

    def metrics(self) -> dict[str, Any]:
        """The one-line summary: train_loss, val_loss, steps, seconds, backend."""
        return {"train_loss": round(self.train_loss, 6), "val_loss": round(self.val_loss, 6), "steps": self.steps,
                "seconds": round(self.seconds, 3), "backend": self.backend}


def train(splits: Splits, config: TrainConfig | None = None, *, backend: str = "engine",
          state: TrainState | None = None, progress: bool = False,
          callback: Callable[[TrainState, float], None] | None = None,
          checkpoint: str | Path | None = None, checkpoint_extra: dict[str, Any] | None = None,
          handle_sigint: bool = False, threads: int | None = 1) -> TrainResult:
    """Train with SGD from ``state`` (a fresh model when None) up to ``config.steps``.

    ``callback(state, loss)`` runs after every step. On KeyboardInterrupt the state of the last
    finished step is saved to ``checkpoint`` if given and :class:`TrainingInterrupted` is
    raised. A finished run is saved there too. With ``handle_sigint``, a first Ctrl-C stops
    after the step in flight, a second one interrupts that step at once, and a Ctrl-C during
    the parameter update, an evaluation or the save is held until it is done: the checkpoint
    is always written. A non-finite loss raises :class:`TrainingDiverged` (nothing saved).

    ``threads`` sets torch's intra-op threads for the run (restored afterwards; None leaves
    them alone). One is the default: a batch-32 step is too small to gain from more, and
    with more, every op stalls whenever another process holds a core (50x slower on a busy
    2-core machine).
    """
    config = (config or TrainConfig()).resolved()
    _require(threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads > 0),
             f"threads must be a positive integer or None (leave torch's setting), got {threads!r}")
    check_splits(splits)
    if state is None:
        state = init_state(config, len(splits.vocab), splits.block_size)
    _check_compatible(state.model, splits, config)
    step_fn = make_step(backend, state.model)
    extra = {"backend": backend, **(checkpoint_extra or {})}
    save = lambda st, **more: save_checkpoint(checkpoint, st, config, splits.vocab, **extra, **more)
    clock = _Clock(state)
    interrupts = _Interrupts(handle_sigint)
    with _threads(threads), interrupts:
        try:
            with _progress(config, state, progress) as bar:
                _loop(splits, config, state, step_fn, callback, interrupts, bar, clock)
        except KeyboardInterrupt:
            with interrupts.held():
                clock.stop()
                path, why_not = _save_interrupted(state, splits, save if checkpoint is not None else None)
            raise TrainingInterrupted(state, path, why_not=why_not) from None
        with interrupts.held():  # the run is complete: evaluate and save it whatever the keyboard says
            with clock.evaluating():
                losses = _final_losses(state, splits, config)
            clock.stop()
            result = TrainResult(config, state, backend, losses["train"], losses["val"], state.seconds,
                                 splits.vocab, clock.step_seconds, clock.steps)
            path = save(state, train_loss=result.train_loss, val_loss=result.val_loss)
    if interrupts.pressed:
        raise TrainingInterrupted(state, path, result=result)
    return result


def _save_interrupted(state: TrainState, splits: Splits, save) -> tuple[Path | None, str | None]:
    """Save the state of an interrupted run: (path, None), or (None, why it was not saved)."""
    if save is None:
        return None, None
    if state.updating:
        return None, "the interrupt landed inside the parameter update"
    if not state.model.is_finite():
        return None, "the parameters are not finite: the run diverged"
    state.model.calibrate(splits.train[0])  # so samples drawn from the checkpoint use calibrated statistics
    try:
        return save(state), None
    except CheckpointError as err:
        return None, str(err)


class _Clock:
    """Wall time of the run (added to the state's, over all resumes) and of the training steps alone."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.seconds_before = state.seconds
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.first_step = state.step
        self.step_seconds = 0.0
        self.steps = 0

    @contextmanager
    def evaluating(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds += time.perf_counter() - began

    def stop(self) -> None:
        elapsed = time.perf_counter() - self.start
        self.state.seconds = self.seconds_before + elapsed
        self.steps = self.state.step - self.first_step
        self.step_seconds = max(0.0, elapsed - self.eval_seconds)


def _loop(splits: Splits, config: TrainConfig, state: TrainState, step_fn: StepFn, callback,
          interrupts: _Interrupts, bar, clock: _Clock) -> None:
    Xtr, Ytr = splits.train
    params = state.model.parameters()
    g = state.generator
    for i in range(state.step, config.steps):
        generator_state = g.get_state()  # to rewind the batch draw if interrupted mid-step
        try:
            ix = torch.randint(0, Xtr.shape[0], (config.batch_size,), generator=g)
            Xb, Yb = Xtr[ix], Ytr[ix]
            loss, grads = step_fn(Xb, Yb)
            lr, value = config.learning_rate(i), loss.item()
            interrupts.holding += 1  # from here to the step's end a Ctrl-C waits: the state stays whole
        except KeyboardInterrupt:
            g.set_state(generator_state)  # nothing changed yet: the state is still that of step i
            raise
        try:
            if not math.isfinite(value):
                raise TrainingDiverged(i + 1, value, config.lr)
            _update(state, params, grads, lr, value)
            if state.step % config.eval_every == 0 and state.step < config.steps:
                with clock.evaluating():
                    losses = split_losses(state.model, splits)
                state.history.append({"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"]})
        finally:
            interrupts.holding -= 1
        bar.step(value, lr)
        if callback is not None:
            callback(state, value)
        if interrupts.pressed and state.step < config.steps:  # after the last step: evaluate and save as finished
            interrupts.stopping = True
            raise KeyboardInterrupt


def _update(state: TrainState, params: list[Tensor], grads: list[Tensor], lr: float, loss: float) -> None:
    """The SGD update of one step; without handle_sigint, an interrupt inside it leaves ``updating`` set."""
    state.updating = True
    with torch.no_grad():
        for p, grad in zip(params, grads):
            p += -lr * grad
    state.step += 1
    state.losses.append(loss)
    state.updating = False


def _final_losses(state: TrainState, splits: Splits, config: TrainConfig) -> dict[str, float]:
    losses = split_losses(state.model, splits)
    bad = [value for value in losses.values() if not math.isfinite(value)]
    if bad or not state.model.is_finite():
        raise TrainingDiverged(state.step, bad[0] if bad else math.nan, config.lr, final=True)
    if not state.history or state.history[-1]["step"] != state.step:
        state.history.append({"step": state.step, "train_loss": losses["train"], "val_loss": losses["val"]})
    return losses


def _check_compatible(model: MLP, splits: Splits, config: TrainConfig) -> None:
    if model.vocab_size != len(splits.vocab):
        raise TrainError(f"the model has {model.vocab_size} characters but the data's vocabulary has "
                         f"{len(splits.vocab)}")
    if model.block_size != splits.block_size:
        raise TrainError(f"the model's block size is {model.block_size} but the data's is {splits.block_size}")


@contextmanager
def _threads(count: int | None):
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Interrupts:
    """Ctrl-C during :func:`train`: the first asks to stop after the step in flight, a second interrupts it.

    Inside :meth:`held` (the parameter update, an evaluation, the final save) a Ctrl-C is only
    noted, so the state there is never left half-written; once stopping, every further Ctrl-C
    is only noted too. Without ``enabled`` (or off the main thread) Python's handler stays.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.presses = 0
        self.holding = 0
        self.stopping = False
        self.previous: Any = None

    @property
    def pressed(self) -> bool:
        return self.presses > 0

    def __enter__(self) -> _Interrupts:
        if self.enabled:
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.presses += 1
        if self.presses >= 2 and not self.holding and not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    @contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1


class _Bar:
    """tqdm progress with the running loss; a no-op when quiet."""

    def __init__(self, config: TrainConfig, state: TrainState, enabled: bool) -> None:
        self.tqdm = None
        if enabled:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=config.steps, initial=state.step, unit="step", dynamic_ncols=True,
                             mininterval=0.5, smoothing=0.05)
        self.recent: list[float] = []

    def step(self, loss: float, lr: float) -> None:
        if self.tqdm is None:
            return
        self.recent.append(loss)
        if len(self.recent) >= 100:
            self.tqdm.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}", lr=f"{lr:g}", refresh=False)
            self.recent.clear()
        self.tqdm.update(1)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


@contextmanager
def _progress(config: TrainConfig, state: TrainState, enabled: bool):
    bar = _Bar(config, state, enabled)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------- checkpoints and outputs


def save_checkpoint(path: str | Path | None, state: TrainState, config: TrainConfig, vocab: Vocab,
                    **extra: Any) -> Path | None:
    """Write the model, vocabulary, config and training state atomically (nothing when ``path`` is None)."""
    if path is None:
        return None
    data = make_checkpoint(
        state.model, vocab, config=asdict(config), step=state.step, generator=state.generator.get_state(),
        losses=torch.tensor(state.losses, dtype=torch.float64), history=[dict(h) for h in state.history],
        seconds=state.seconds, **extra)
    return save_atomic(data, path)


def state_from_checkpoint(data: dict[str, Any], source: str | Path | None = None
                          ) -> tuple[TrainState, TrainConfig, Vocab]:
    """The training state, configuration and vocabulary saved by :func:`save_checkpoint`.

    A checkpoint without them (or with unusable ones) raises :class:`CheckpointError` naming ``source``.
    """
    model, vocab = model_from_checkpoint(data)
    try:
        generator = torch.Generator()
        generator.set_state(data["generator"])
        losses = [float(x) for x in data["losses"].tolist()]
        state = TrainState(model, generator, int(data["step"]), losses,
                           [dict(h) for h in data.get("history", [])], float(data.get("seconds", 0.0)))
        config = TrainConfig(**data["config"])
        config.check()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else (str(err).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{source or 'the checkpoint'}: cannot resume from it: its training state is "
                              f"unusable ({what or type(err).__name__})") from None
    if len(losses) != state.step:
        raise CheckpointError(f"{source or 'the checkpoint'}: cannot resume from it: it holds {len(losses)} losses "
                              f"for {state.step} steps")
    return state, config, vocab


def plot_losses(result: TrainResult, path: str | Path) -> Path:
    """The loss curve: log10 of every step's batch loss, smoothed, with the full train/val losses marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    losses = torch.tensor(result.state.losses, dtype=torch.float64).log10()
    steps = torch.arange(1, len(losses) + 1)
    window = max(1, min(1000, len(losses) // 50))
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    if len(losses) <= 5000:  # beyond that, single steps are a solid band that hides the curve
        ax.plot(steps, losses, color="tab:blue", alpha=0.15, linewidth=0.5, label="batch loss (every step)")
    if len(losses) >= window:
        smooth = losses.unfold(0, window, 1).mean(1)
        ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.6, label=f"batch loss, mean of {window}")
    history = result.state.history
    if history:
        hs = [h["step"] for h in history]
        ax.plot(hs, [math.log10(h["train_loss"]) for h in history], "o-", color="tab:green", markersize=4,
                label="train split (calibrated batchnorm)")
        ax.plot(hs, [math.log10(h["val_loss"]) for h in history], "s-", color="tab:red", markersize=4,
                label="val split (calibrated batchnorm)")
    decay = result.config.lr_decay_step
    if decay is not None and 0 < decay < result.steps:
        ax.axvline(decay, color="gray", linestyle="--", linewidth=0.8, label=f"lr {result.config.lr:g} -> "
                   f"{result.config.learning_rate(decay):g}")
    focus = [smooth] if len(losses) >= window else [losses]
    focus += [torch.tensor([math.log10(h[k]) for h in history for k in ("train_loss", "val_loss")])] if history else []
    low, high = min(f.min().item() for f in focus), max(f.max().item() for f in focus)
    margin = max(0.02, 0.15 * (high - low))
    ax.set_ylim(low - margin, high + margin)  # the smoothed curve and the splits; single steps are noisier
    ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(f"makemore MLP, {result.backend} backend: train {result.train_loss:.4f}, "
                 f"val {result.val_loss:.4f} after {result.steps:,} steps")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def render_step(model: MLP, splits: Splits, path: str | Path, seed: int = SEED) -> tuple[Path | None, str | None]:
    """Draw one training step's recorded graph; (path, None), or (None, why not)."""
    g = torch.Generator().manual_seed(seed)
    Xtr, Ytr = splits.train
    ix = torch.randint(0, Xtr.shape[0], (min(32, Xtr.shape[0]),), generator=g)
    graph, _ = record_step(model, Xtr[ix], Ytr[ix])
    try:
        rendered = graph.render(path)
    except ModuleNotFoundError as err:
        if err.name == "tensorgraph.render":
            return None, "graph picture skipped: tensorgraph.render is not available yet"
        raise
    except Exception as err:  # noqa: BLE001 - a missing Graphviz must not lose a finished training run
        return None, f"graph picture skipped: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    if isinstance(rendered, (str, os.PathLike)) and Path(rendered).exists():
        return Path(rendered), None
    return (Path(path), None) if Path(path).exists() else (None, "graph picture skipped: render wrote no file")


def write_outputs(result: TrainResult, splits: Splits, out: str | Path, *, samples: list[str],
                  info: dict[str, Any] | None = None, render: bool = True) -> dict[str, Any]:
    """The loss curve, the graph picture and metrics.json in ``out`` (the checkpoint is saved by train)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _writing(out / "loss.png"):
        files: dict[str, Any] = {"loss_curve": str(plot_losses(result, out / "loss.png"))}
    notes = []
    if render:
        picture, note = render_step(result.model, splits, out / "graph.svg", result.config.seed)
        files["graph"] = str(picture) if picture else None
        if note:
            notes.append(note)
    metrics = {
        **result.metrics(),
        "seconds_per_step": result.seconds / max(1, result.steps),
        "steps_per_second": round(result.steps_per_second, 1),  # this call's steps alone, evaluations excluded
        "config": asdict(result.config),
        "vocab_size": len(result.vocab),
        "num_parameters": result.model.num_parameters(),
        "history": result.state.history,
        "samples": samples,
        "files": files,
        "notes": notes,
        "torch": torch.__version__,
        **(info or {}),
    }
    with _writing(out / "metrics.json"):
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@contextmanager
def _writing(path: Path):
    """An OSError while writing ``path`` (a full disk says only "[Errno 28]") becomes one naming the file."""
    try:
        yield
    except OSError as err:
        raise TrainError(f"cannot write {path}: {err.strerror or err}") from None
