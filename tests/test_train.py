"""Training the makemore MLP: backends agree with torch autograd, seeds reproduce, checkpoints resume exactly.

Short runs on a slice of names.txt (a few hundred words, a small hidden layer), so the
whole file takes a few seconds. The full 200,000-step run is measured, not tested
(docs/training.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys

import pytest
import torch

from tensorgraph.makemore.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_atomic,
)
from tensorgraph.makemore.data import default_path, load_splits, load_words
from tensorgraph.makemore.model import MLP, PARAMETER_NAMES, forward
from tensorgraph.makemore.train import (
    BACKENDS,
    TrainConfig,
    TrainError,
    TrainingInterrupted,
    state_from_checkpoint,
    train,
)

SMALL = dict(n_hidden=32, batch_size=32, eval_every=50)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The first 600 names (the lecture's shuffle and 80/10/10 split of them)."""
    path = tmp_path_factory.mktemp("data") / "names600.txt"
    path.write_text("\n".join(load_words()[:600]) + "\n")
    return load_splits(path)


def params_of(result):
    return [p.clone() for p in result.model.parameters()]


# ---------------------------------------------------------------- the model


def test_init_is_the_lectures_and_seeded():
    """Every draw from the one generator, in the lecture's order and scales (bngain/bnbias too)."""
    g = torch.Generator().manual_seed(7)
    model = MLP.init(27, n_embd=10, n_hidden=200, generator=g)
    ref = torch.Generator().manual_seed(7)
    C = torch.randn((27, 10), generator=ref)
    W1 = torch.randn((30, 200), generator=ref) * (5 / 3) / 30**0.5
    b1 = torch.randn(200, generator=ref) * 0.1
    W2 = torch.randn((200, 27), generator=ref) * 0.1
    b2 = torch.randn(27, generator=ref) * 0.1
    bngain = torch.randn((1, 200), generator=ref) * 0.1 + 1.0
    bnbias = torch.randn((1, 200), generator=ref) * 0.1
    for got, want in zip(model.parameters(), [C, W1, b1, W2, b2, bngain, bnbias]):
        assert torch.equal(got, want)
    assert model.num_parameters() == 27 * 10 + 30 * 200 + 200 + 200 * 27 + 27 + 2 * 200


def test_forward_matches_the_lectures_functional_loss(splits):
    """The exercise-4 forward equals the same network written with torch.nn.functional, in float64."""
    model = MLP.init(len(splits.vocab), n_hidden=16, generator=torch.Generator().manual_seed(3))
    params = [p.double() for p in model.parameters()]
    Xb, Yb = splits.train[0][:32], splits.train[1][:32]
    C, W1, b1, W2, b2, bngain, bnbias = params
    hpre = C[Xb].flatten(1) @ W1 + b1
    hpre = F_batch_norm(hpre) * bngain + bnbias
    want = torch.nn.functional.cross_entropy(torch.tanh(hpre) @ W2 + b2, Yb)
    assert torch.allclose(forward(*params, Xb, Yb), want, rtol=1e-12, atol=0)


def F_batch_norm(x):
    """Batchnorm with the unbiased variance (the lecture's training-time normalisation)."""
    mean = x.mean(0, keepdim=True)
    var = ((x - mean) ** 2).sum(0, keepdim=True) / (x.shape[0] - 1)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_evaluate_and_sample_need_calibration(splits):
    model = MLP.init(len(splits.vocab), n_hidden=16)
    with pytest.raises(ValueError, match="calibrate"):
        model.evaluate(*splits.val)
    model.calibrate(splits.train[0])
    X = splits.train[0]
    hpre = model.C[X].flatten(1) @ model.W1 + model.b1
    assert torch.allclose(model.bnmean, hpre.mean(0, keepdim=True))
    assert torch.allclose(model.bnvar, hpre.var(0, keepdim=True, unbiased=True))
    names = model.sample(splits.vocab, 5, generator=torch.Generator().manual_seed(1), max_length=12)
    again = model.sample(splits.vocab, 5, generator=torch.Generator().manual_seed(1), max_length=12)
    assert names == again and len(names) == 5
    assert all(len(name) <= 12 and set(name) <= set(splits.vocab.stoi) - {"."} for name in names)


# ---------------------------------------------------------------- backends and training

# Tolerances for "the same trajectory": float32 with a loss near 2.5 has an ulp of 2.4e-7.
# The engine's rules mirror torch's formulas, so today the runs are bit-identical; the
# tolerance (1e-4 on the loss, about 400 ulps, and on the parameters) still lets a future
# rule reorder a sum (a few ulps per step, amplified slowly by SGD over 200 steps) while any
# wrong gradient moves the loss by far more than 1e-4 within a few steps.
LOSS_TOL = 1e-4


def available_backends():
    out = ["engine"]
    if importlib.util.find_spec("tensorgraph.compiler") is not None:
        out.append("compiled")
    return out


@pytest.mark.parametrize("backend", available_backends())
def test_backend_follows_torch_autograd_step_for_step(splits, backend):
    config = TrainConfig(steps=200, **SMALL)
    ref_losses, got_losses = [], []
    ref = train(splits, config, backend="torch", callback=lambda st, loss: ref_losses.append(loss))
    got = train(splits, config, backend=backend, callback=lambda st, loss: got_losses.append(loss))
    assert len(got_losses) == len(ref_losses) == 200
    worst = max(abs(a - b) for a, b in zip(got_losses, ref_losses))
    assert worst <= LOSS_TOL, f"{backend} drifted from torch autograd by {worst:.3g}"
    for name, a, b in zip(PARAMETER_NAMES, got.model.parameters(), ref.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=LOSS_TOL), name
    assert abs(got.val_loss - ref.val_loss) <= LOSS_TOL


def test_engine_gradients_equal_torch_autograd_on_one_step(splits):
    """The step functions themselves: gradients of every parameter against torch.autograd in float64."""
    model = MLP.init(len(splits.vocab), n_hidden=24, generator=torch.Generator().manual_seed(5))
    for name in PARAMETER_NAMES:
        setattr(model, name, getattr(model, name).double())
    Xb, Yb = splits.train[0][:40], splits.train[1][:40]
    loss_e, grads_e = BACKENDS["engine"](model)(Xb, Yb)
    leaves = [p.detach().requires_grad_() for p in model.parameters()]
    want = torch.autograd.grad(forward(*leaves, Xb, Yb), leaves)
    for name, a, b in zip(PARAMETER_NAMES, grads_e, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_loss_falls(splits):
    result = train(splits, TrainConfig(steps=300, **SMALL))
    first, last = result.state.losses[:20], result.state.losses[-50:]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.4
    assert result.val_loss < 2.9 < torch.log(torch.tensor(float(len(splits.vocab)))).item()
    assert [h["step"] for h in result.state.history] == [50, 100, 150, 200, 250, 300]


def test_same_seed_same_numbers_different_seed_different(splits):
    config = TrainConfig(steps=100, seed=11, **SMALL)
    a, b = train(splits, config), train(splits, config)
    c = train(splits, TrainConfig(steps=100, seed=12, **SMALL))
    assert a.state.losses == b.state.losses and a.val_loss == b.val_loss
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert a.state.losses != c.state.losses


def test_learning_rate_schedule():
    config = TrainConfig().resolved()
    assert (config.lr_decay_step, config.lr_final, config.eval_every) == (100_000, 0.1 / 10, 20_000)
    assert config.learning_rate(99_999) == 0.1 and config.learning_rate(100_000) == pytest.approx(0.01)
    assert TrainConfig(steps=10, lr=0.5, lr_final=0.2, lr_decay_step=3).learning_rate(3) == 0.2


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be a positive"), (dict(steps=-5), "steps"), (dict(batch_size=1), "at least 2"),
    (dict(n_hidden=0), "n_hidden"), (dict(lr=0.0), "lr must be"), (dict(lr=float("nan")), "lr must be"),
    (dict(seed=-1), "seed"), (dict(eval_every=0), "eval_every"),
])
def test_bad_config_is_refused(splits, bad, message):
    with pytest.raises(TrainError, match=message):
        train(splits, TrainConfig(**bad))


def test_unknown_and_unavailable_backends(splits, monkeypatch):
    with pytest.raises(TrainError, match="unknown backend 'jax'"):
        train(splits, TrainConfig(steps=2, **SMALL), backend="jax")
    monkeypatch.setitem(sys.modules, "tensorgraph.compiler", None)  # as if compiler.py were not there
    with pytest.raises(TrainError, match="backend 'compiled' is not available"):
        train(splits, TrainConfig(steps=2, **SMALL), backend="compiled")


def test_bad_threads_and_splits_are_refused_by_name(splits):
    """threads=0 failed in torch ("set_num_threads expects a positive integer"), naming no argument; a file name
    for the splits failed with AttributeError: 'str' object has no attribute 'train'."""
    with pytest.raises(TrainError, match=r"^threads must be a positive integer or None .*got 0$"):
        train(splits, TrainConfig(steps=2, **SMALL), threads=0)
    with pytest.raises(TrainError, match=r"^expected the Splits that load_splits\(path\) returns, not str"):
        train("names.txt", TrainConfig(steps=2, **SMALL))


def test_too_few_words(tmp_path):
    path = tmp_path / "five.txt"
    path.write_text("anna\nbob\ncyd\ndee\neve\n")  # 80/10/10 of 5 words leaves the val split empty
    with pytest.raises(TrainError, match="val split is empty"):
        train(load_splits(path), TrainConfig(steps=2, **SMALL))


# ---------------------------------------------------------------- checkpoints, interrupt, resume


def test_checkpoint_round_trip(splits, tmp_path):
    result = train(splits, TrainConfig(steps=30, **SMALL), checkpoint=tmp_path / "model.pt")
    data = load_checkpoint(tmp_path / "model.pt")
    model, vocab = model_from_checkpoint(data)
    assert vocab == splits.vocab and data["step"] == 30 and data["backend"] == "engine"
    for a, b in zip(model.parameters(), result.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(model.bnmean, result.model.bnmean) and torch.equal(model.bnvar, result.model.bnvar)
    assert model.evaluate(*splits.val) == result.val_loss
    assert data["val_loss"] == result.val_loss
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind
    assert oct(os.stat(tmp_path / "model.pt").st_mode & 0o777) != oct(0o600)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    save_atomic({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a tensorgraph checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a tensorgraph makemore checkpoint"):
        load_checkpoint(other)
    model = MLP.init(5, n_hidden=4)
    data = make_checkpoint(model, load_splits(default_path()).vocab)  # 27 characters, C has 5 rows
    torch.save(data, other)
    with pytest.raises(CheckpointError, match="parameter C has shape"):
        load_checkpoint(other)


def test_interrupt_then_resume_continues_the_same_trajectory(splits, tmp_path):
    """Ctrl-C (a callback raising KeyboardInterrupt) saves a checkpoint; resuming matches an uninterrupted run."""
    config = TrainConfig(steps=160, **SMALL)
    straight = train(splits, config)

    def stop_at_70(state, loss):
        if state.step == 70:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="interrupted at step 70; checkpoint saved") as info:
        train(splits, config, callback=stop_at_70, checkpoint=tmp_path / "model.pt")
    assert info.value.path == tmp_path / "model.pt"
    state, saved_config, vocab = state_from_checkpoint(load_checkpoint(tmp_path / "model.pt"))
    assert state.step == 70 and saved_config == config.resolved() and vocab == splits.vocab
    resumed = train(splits, saved_config, state=state)
    assert resumed.state.losses == straight.state.losses
    assert resumed.state.history == straight.state.history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), straight.model.parameters()))


def _torch_backend_stopped_at(call: int, stop):
    """The torch backend, running ``stop()`` at the start of its ``call``-th step."""
    calls = {"n": 0}

    def backend(model):
        step = BACKENDS["torch"](model)

        def run(Xb, Yb):
            calls["n"] += 1
            if calls["n"] == call:
                stop()
            return step(Xb, Yb)

        return run

    return backend


def test_interrupt_inside_a_step_rewinds_the_batch_draw(splits, tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of a step: the state saved is that of the last finished step."""
    config = TrainConfig(steps=60, **SMALL)
    straight = train(splits, config, backend="torch")

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setitem(BACKENDS, "flaky", _torch_backend_stopped_at(25, interrupt))
    with pytest.raises(TrainingInterrupted, match="at step 24"):
        train(splits, config, backend="flaky", checkpoint=tmp_path / "model.pt")
    state, saved_config, _ = state_from_checkpoint(load_checkpoint(tmp_path / "model.pt"))
    resumed = train(splits, saved_config, state=state, backend="torch")
    assert resumed.state.losses == straight.state.losses


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_real_sigint_stops_at_the_end_of_the_step(splits, tmp_path):
    def press_ctrl_c(state, loss):
        if state.step == 20:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train(splits, TrainConfig(steps=60, **SMALL), callback=press_ctrl_c, checkpoint=tmp_path / "model.pt",
              handle_sigint=True)
    assert info.value.state.step == 20 and (tmp_path / "model.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_threads_are_restored(splits):
    before = torch.get_num_threads()
    train(splits, TrainConfig(steps=3, **SMALL), threads=1)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- Ctrl-C at the edges, divergence, damaged files


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_the_final_evaluation_saves_the_finished_run(splits, tmp_path, monkeypatch):
    """Ctrl-C after the last step (in the final train/val evaluation): the finished run is evaluated and saved."""
    train_module = importlib.import_module("tensorgraph.makemore.train")  # the package exports train(), a function

    config = TrainConfig(steps=60, **SMALL)
    straight = train(splits, config)
    real, finished = train_module.split_losses, {"yes": False}

    def mark(state, loss):
        finished["yes"] = state.step == config.steps

    def press_during_final_evaluation(*args, **kwargs):
        if finished["yes"]:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "split_losses", press_during_final_evaluation)
    with pytest.raises(TrainingInterrupted, match="after its last step \\(60\\); the finished run is saved") as info:
        train(splits, config, callback=mark, checkpoint=tmp_path / "model.pt", handle_sigint=True)
    assert info.value.result is not None and info.value.result.val_loss == straight.val_loss
    data = load_checkpoint(tmp_path / "model.pt")
    assert data["step"] == 60 and data["train_loss"] == straight.train_loss and data["val_loss"] == straight.val_loss


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_during_the_save_still_saves(splits, tmp_path, monkeypatch):
    train_module = importlib.import_module("tensorgraph.makemore.train")  # the package exports train(), a function

    real = train_module.save_atomic

    def press_again_then_save(obj, path):
        os.kill(os.getpid(), signal.SIGINT)
        return real(obj, path)

    def press_ctrl_c(state, loss):
        if state.step == 20:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module, "save_atomic", press_again_then_save)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="at step 20; checkpoint saved to"):
        train(splits, TrainConfig(steps=60, **SMALL), callback=press_ctrl_c, checkpoint=tmp_path / "model.pt",
              handle_sigint=True)
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 20
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_a_second_ctrl_c_inside_a_step_saves_the_last_finished_step(splits, tmp_path, monkeypatch):
    """Two Ctrl-C inside step 25: it is abandoned, step 24 is saved, and resuming matches an uninterrupted run."""
    config = TrainConfig(steps=60, **SMALL)
    straight = train(splits, config, backend="torch")

    def press_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setitem(BACKENDS, "pressed", _torch_backend_stopped_at(25, press_twice))
    with pytest.raises(TrainingInterrupted, match="at step 24; checkpoint saved"):
        train(splits, config, backend="pressed", checkpoint=tmp_path / "model.pt", handle_sigint=True)
    state, saved_config, _ = state_from_checkpoint(load_checkpoint(tmp_path / "model.pt"))
    assert train(splits, saved_config, state=state, backend="torch").state.losses == straight.state.losses


def test_a_diverging_run_stops_with_its_step_and_saves_nothing(splits, tmp_path):
    from tensorgraph.makemore.train import TrainingDiverged

    config = TrainConfig(steps=50, lr=1e30, **SMALL)
    with pytest.raises(TrainingDiverged, match=r"diverged at step (\d+): its loss is (nan|inf).*smaller learning rate"
                       ) as info:
        train(splits, config, checkpoint=tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
    # the truth: torch autograd on the same steps meets its first non-finite loss at the same step
    seen = []
    with pytest.raises(TrainingDiverged):
        train(splits, config, backend="torch", callback=lambda state, loss: seen.append(loss))
    assert info.value.step == len(seen) + 1 and all(torch.isfinite(torch.tensor(seen)))


def test_a_checkpoint_with_non_finite_parameters_is_refused(splits, tmp_path):
    model = MLP.init(len(splits.vocab), n_hidden=4)
    model.W1[0, 0] = float("nan")
    save_atomic(make_checkpoint(model, splits.vocab), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt: the checkpoint's W1 hold non-finite values.*smaller --lr"):
        load_checkpoint(tmp_path / "model.pt")


def _w1_offset(path, data):
    """Where W1's bytes lie in the checkpoint file (torch.save stores each tensor's bytes as they are)."""
    raw = path.read_bytes()
    offset = raw.find(data["params"]["W1"].numpy().tobytes())
    assert offset > 0
    return raw, offset


def test_a_corrupted_checkpoint_is_refused(splits, tmp_path):
    """20 bytes overwritten inside W1: torch.load reads other numbers without complaint; the checksum catches it."""
    path = tmp_path / "model.pt"
    train(splits, TrainConfig(steps=10, **SMALL), checkpoint=path)
    raw, offset = _w1_offset(path, load_checkpoint(path))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(raw[:offset + 8] + b"X" * 20 + raw[offset + 28:])
    unverified = torch.load(damaged, weights_only=True)["params"]["W1"]  # the truth: the file holds other values
    assert not torch.equal(unverified, torch.load(path, weights_only=True)["params"]["W1"])
    with pytest.raises(CheckpointError, match="damaged.pt is not a tensorgraph checkpoint, or it is truncated/corrupt "
                                              r"\(its contents do not match the sha256"):
        load_checkpoint(damaged)


def test_checkpoints_without_a_checksum(splits, tmp_path):
    """Version 1 (before checksums) loads, with a note; a version-2 file whose checksum was removed does not."""
    from tensorgraph.makemore.checkpoint import unverified_note

    data = make_checkpoint(MLP.init(len(splits.vocab), n_hidden=4), splits.vocab)
    del data["checksum"]
    torch.save({**data, "version": 1}, tmp_path / "v1.pt")
    old = load_checkpoint(tmp_path / "v1.pt")
    assert "has no checksum" in unverified_note(old, tmp_path / "v1.pt")
    torch.save(data, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="truncated/corrupt \\(its checksum is missing"):
        load_checkpoint(tmp_path / "v2.pt")


@pytest.mark.parametrize("keep", [100, 1000, 0.5])
def test_truncated_checkpoints_say_so(splits, tmp_path, keep):
    path = tmp_path / "model.pt"
    train(splits, TrainConfig(steps=5, **SMALL), checkpoint=path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: int(keep * len(raw)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"cut.pt is not a tensorgraph checkpoint, or it is truncated/corrupt") \
            as info:
        load_checkpoint(cut)
    assert "PyTorch 2.6" not in str(info.value) and len(str(info.value)) < 300


def test_a_bad_generator_state_names_the_file(splits, tmp_path):
    model = MLP.init(len(splits.vocab), n_hidden=4)
    data = make_checkpoint(model, splits.vocab, generator=torch.zeros(3, dtype=torch.uint8), step=0,
                           losses=torch.zeros(0, dtype=torch.float64), config={})
    torch.save(data, tmp_path / "model.pt")  # a consistent checksum: only the generator is wrong
    with pytest.raises(CheckpointError, match="model.pt is not a tensorgraph checkpoint.*generator state is invalid"):
        load_checkpoint(tmp_path / "model.pt")


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    plain = load_words()[:200]
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(plain).encode() + b"\r\n")
    assert load_words(path) == plain
    assert load_splits(path).vocab == load_splits(_write(tmp_path / "plain.txt", plain)).vocab


def _write(path, words):
    path.write_text("\n".join(words) + "\n")
    return path


def test_raising_steps_on_resume_moves_a_decay_not_yet_reached(splits):
    """Interrupted at 30 of 100 steps (decay at 50), resumed to 200: the run of 200 steps straight (decay at 100)."""
    from tensorgraph.makemore.train import extend_config

    straight = train(splits, TrainConfig(steps=200, **SMALL))

    def stop_at_30(state, loss):
        if state.step == 30:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(splits, TrainConfig(steps=100, **SMALL), callback=stop_at_30)
    config, note = extend_config(TrainConfig(steps=100, **SMALL).resolved(), info.value.state, 200)
    assert config.lr_decay_step == 100 and "decays at step 100, half-way of the new 200 steps" in note
    resumed = train(splits, config, state=info.value.state)
    assert resumed.state.losses == straight.state.losses


def test_raising_steps_after_the_decay_keeps_it_and_says_so(splits):
    from tensorgraph.makemore.train import extend_config

    first = train(splits, TrainConfig(steps=40, **SMALL))  # decayed at 20
    config, note = extend_config(first.config, first.state, 100)
    assert config.lr_decay_step == 20 and config.learning_rate(40) == pytest.approx(0.01)
    assert "already decayed at step 20" in note and "stays at 0.01" in note
    explicit, note = extend_config(TrainConfig(steps=40, lr_decay_step=30, **SMALL).resolved(), first.state, 100)
    assert explicit.lr_decay_step == 30 and note is None


def test_the_speed_excludes_the_evaluations(splits, monkeypatch):
    import time

    train_module = importlib.import_module("tensorgraph.makemore.train")  # the package exports train(), a function

    real = train_module.split_losses

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "split_losses", slow)
    result = train(splits, TrainConfig(steps=40, n_hidden=32, eval_every=10))  # 3 evaluations + the final one
    assert result.seconds - result.step_seconds >= 4 * 0.25 and result.session_steps == 40
    assert result.steps_per_second == pytest.approx(40 / result.step_seconds)


@pytest.mark.skipif(importlib.util.find_spec("tensorgraph.compiler") is None, reason="tg.compile not built")
def test_the_compiled_backend_skips_the_fused_derivation(splits, monkeypatch):
    """The fused rules never win for this forward; deriving them cost seconds of sympy at every start."""
    symbolic = importlib.import_module("tensorgraph.symbolic")
    calls = []
    monkeypatch.setattr(symbolic, "auto_fuse", lambda *args: calls.append(args) or args[0], raising=True)
    config = TrainConfig(steps=20, **SMALL)
    compiled = train(splits, config, backend="compiled")
    assert not calls
    assert compiled.state.losses == train(splits, config, backend="engine").state.losses
