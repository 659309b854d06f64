"""How large an AP difference a leaderboard can resolve (pure functions).

A ranking inside the seed noise is not a ranking. With n seeds per method and a pooled seed
standard deviation sigma, a two-sided two-sample t-test at level alpha detects a true difference
delta with the given power when delta >= (t_{1-alpha/2, df} + t_{power, df}) * sigma * sqrt(2 / n),
df = 2 (n - 1). The Student t quantiles come from the regularized incomplete beta function, so no
statistics package is needed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

import pandas as pd


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _incomplete_beta_fraction(a, b, x) / a
    return 1 - front * _incomplete_beta_fraction(b, a, 1 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on the CDF."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def minimum_detectable_difference(sigma: float, n_seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference between two methods' means that n seeds each detect with ``power``."""
    if n_seeds < 2:
        raise ValueError("a seed spread needs at least two seeds")
    df = 2 * (n_seeds - 1)
    return (student_t_quantile(1 - alpha / 2, df) + student_t_quantile(power, df)) * sigma * math.sqrt(2 / n_seeds)


def pooled_std(stds: Sequence[float]) -> float:
    """Pooled standard deviation of groups of equal size (root mean of the variances)."""
    values = [s for s in stds if not math.isnan(s)]
    return math.sqrt(sum(s * s for s in values) / len(values)) if values else math.nan


def detectable_difference(board: pd.DataFrame, metric: str = "AP") -> tuple[float, int] | None:
    """The smallest ``metric`` difference a leaderboard's seeds detect (the pooled seed std of its rows, the fewest
    seeds any row has) and that seed count; None with fewer than two seeds, where there is no spread to test against."""
    n_seeds = int(board["n_seeds"].min()) if len(board) else 0
    if n_seeds < 2:
        return None
    return minimum_detectable_difference(pooled_std(board[f"{metric}_std"].tolist()), n_seeds), n_seeds


def separated_pairs(means: Mapping[str, float], difference: float) -> list[tuple[str, str]]:
    """Method pairs whose means differ by at least ``difference``."""
    return [(a, b) for a, b in combinations(sorted(means), 2) if abs(means[a] - means[b]) >= difference]
