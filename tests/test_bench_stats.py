"""The benchmark harness's verdicts: per-repeat pairing, the confidence
interval of the median, and met / NOT met / within noise.

A target marked met on the strength of a lucky median is the failure these
guard against, so the interval's coverage is checked against the binomial
distribution computed here independently, and by simulation.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"
_spec = importlib.util.spec_from_file_location("pollpool_bench_compare", _PATH)
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # its dataclasses look themselves up there
_spec.loader.exec_module(compare)


@pytest.fixture(autouse=True)
def backend():
    """No server here: one run, not one per I/O backend."""
    return None


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= true median <= x_(n+1-k)) for n independent draws."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2**n
    return 1.0 - 2.0 * tail


@pytest.mark.parametrize("n", range(1, 32))
def test_interval_is_the_narrowest_with_enough_coverage(n):
    xs = [float(i) for i in range(1, n + 1)]   # x_(k) == k
    ci = compare.median_ci(xs, level=0.9)
    ks = [k for k in range(1, n // 2 + 1) if _coverage(n, k) >= 0.9]
    if not ks:
        assert ci is None
        return
    k = max(ks)
    assert ci == (float(k), float(n + 1 - k))


def test_interval_known_values_and_input_order():
    assert compare.median_ci([5, 1, 4, 2, 3]) == (1, 5)   # n=5: 0.9375
    assert compare.median_ci([1, 2, 3, 4]) is None        # n=4: 0.875 at best
    xs = list(range(1, 16))
    random.Random(1).shuffle(xs)
    assert compare.median_ci(xs) == (4, 12)               # n=15: 0.965


def test_interval_covers_the_median_as_often_as_it_claims():
    rng = random.Random(7)
    n, trials, hits = 15, 4000, 0
    for _ in range(trials):
        # Skewed, like ratios disturbed by a slow phase: true median 1.0.
        xs = [math.exp(rng.gauss(0.0, 0.1)) * (0.8 if rng.random() < 0.2 else 1.0)
              for _ in range(n)]
        lo, hi = compare.median_ci(xs)
        hits += lo <= _true_median() <= hi
    # Coverage for n=15 is 0.965; 4000 trials put 3 sigma at 0.009.
    assert hits / trials > 0.94


def _true_median() -> float:
    """The median of exp(N(0, 0.1)) * (0.8 with p=0.2, else 1): solved
    numerically, F(m) = 0.8 Phi(ln m / 0.1) + 0.2 Phi(ln(m / 0.8) / 0.1)."""
    def cdf(m: float) -> float:
        phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
        return 0.8 * phi(math.log(m) / 0.1) + 0.2 * phi(math.log(m / 0.8) / 0.1)
    lo, hi = 0.5, 1.5
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.5 else (lo, mid)
    return lo


@pytest.mark.parametrize("ci, op, bound, want", [
    ((0.96, 1.10), ">=", 0.95, "met"),
    ((0.90, 1.10), ">=", 0.95, "within noise"),
    ((0.80, 0.94), ">=", 0.95, "NOT met"),
    ((0.95, 0.99), ">=", 0.95, "met"),                 # the bound itself counts
    ((0.96, 1.12), "<=", 1.15, "met"),
    ((1.06, 1.21), "<=", 1.15, "within noise"),
    ((1.16, 1.30), "<=", 1.15, "NOT met"),
])
def test_judge_follows_the_whole_interval(ci, op, bound, want):
    assert compare.judge(ci, (ci[0] + ci[1]) / 2, op, bound) == want


def test_judge_without_an_interval_says_so():
    assert compare.judge(None, 1.2, ">=", 1.0).startswith("met (too few repeats")
    assert compare.judge(None, 0.8, ">=", 1.0).startswith("NOT met (too few repeats")


@pytest.mark.parametrize("ci, want", [
    # An end just short of the bound prints short of it, not as the bound.
    ((0.9499188, 1.0148189), "0.949–1.015"),
    ((0.95, 0.99), "0.950–0.990"),                     # exact ends stay put
    ((1.0197, 1.0614), "1.019–1.062"),
    (None, "–"),
])
def test_interval_text_rounds_outwards(ci, want):
    assert compare.ci_text(ci) == want


def test_interval_text_keeps_the_verdict_visible():
    """The printed interval holds the exact one and is at most a rounding
    step wider at each end, so it never reads as a firmer verdict than the
    exact one: whatever is within noise prints as within noise."""
    rng = random.Random(7)
    for _ in range(2000):
        lo = rng.uniform(0.8, 1.3)
        ci = (lo, lo + rng.uniform(0.0, 0.2))
        shown = tuple(float(x) for x in compare.ci_text(ci).split("–"))
        assert shown[0] <= ci[0] + 1e-12 and shown[1] >= ci[1] - 1e-12
        assert shown[1] - shown[0] <= ci[1] - ci[0] + 0.002 + 1e-12
        for op, bound in ((">=", 0.9), (">=", 0.95), (">=", 1.0),
                          ("<=", 1.0), ("<=", 1.15), ("<=", 1.25)):
            exact = compare.judge(ci, 1.0, op, bound)
            if exact == "within noise":
                assert compare.judge(shown, 1.0, op, bound) == exact


def _run(rep, server, rps, **extra):
    return {"scenario": "s", "placement": "pinned", "server": server, "repeat": rep,
            "rps": rps, **extra}


def test_ratios_pair_servers_within_a_repeat_only():
    runs = [
        _run(0, "a", 90.0), _run(0, "ref", 100.0),
        _run(1, "a", 200.0), _run(1, "ref", 100.0),
        # A disturbed attempt is discarded; its retry in the same repeat counts.
        _run(2, "a", 1.0, discarded="busy"), _run(2, "a", 120.0), _run(2, "ref", 100.0),
        _run(3, "a", 50.0),                                # no partner: left out
        _run(4, "a", 70.0), _run(4, "ref", 0.0),           # no division by zero
        _run(5, "a", 80.0, placement="unpinned"), _run(5, "ref", 100.0),
    ]
    got = compare.paired_ratios(runs, "s", "pinned", "a", "ref", "rps")
    assert got == pytest.approx([0.9, 2.0, 1.2])
