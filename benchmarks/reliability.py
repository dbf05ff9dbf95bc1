"""What the reliability checks cost, as ratios within one run (docs/reliability.md quotes them).

    .venv/bin/python benchmarks/reliability.py [--repeats 400]

* anomaly mode: the lecture's forward recorded and backpropagated with ``tg.record(anomaly=True)``
  against the same with ``anomaly=False`` (every op's output and every gradient checked for nan/inf);
* leaf fingerprints: the checksums of the leaves taken at the end of recording and compared before
  backward (how ``W.data -= ...`` between the two is caught), against the step they belong to.

Timings interleave the variants and take medians, so that a busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tensorgraph as tg
from tensorgraph.engine import LeafStamps
from tensorgraph.lecture import forward, setup


def lecture_step(ex, anomaly: bool) -> None:
    with tg.record(anomaly=anomaly) as graph:
        loss = forward(ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias, ex.Xb, ex.Yb)
    graph.backward(loss)


def fingerprints(ex) -> None:
    """What recording (stamp the leaves) and backward (compare) spend on the leaf check."""
    leaves = (ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias, ex.Xb, ex.Yb)
    stamps = LeafStamps(list(enumerate(leaves)))
    assert not stamps.changed()


def measure(repeats: int) -> dict[str, float]:
    ex = setup()
    variants = {"plain": lambda: lecture_step(ex, False), "anomaly": lambda: lecture_step(ex, True),
                "fingerprints": lambda: fingerprints(ex)}
    for fn in variants.values():  # warm up
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    medians = measure(args.repeats)
    plain = medians["plain"]
    print(f"lecture forward + backward, recorded (median of {args.repeats}, torch {torch.__version__}, 1 thread)")
    print(f"  anomaly=False  {plain * 1e6:8.0f} us")
    print(f"  anomaly=True   {medians['anomaly'] * 1e6:8.0f} us   ratio {medians['anomaly'] / plain:.2f}x")
    print(f"  leaf fingerprints (9 leaves, at record end and before backward) {medians['fingerprints'] * 1e6:.0f} us"
          f" = {medians['fingerprints'] / plain:.1%} of the plain step")


if __name__ == "__main__":
    main()
