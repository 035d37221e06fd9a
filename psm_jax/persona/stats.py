"""Statistics that turn a study's numbers into evidence: intervals, null bands, monotonicity, correlations.

Every interval here resamples *independent units* (questions, roles, conversations x probes): the caller
passes one value per unit, never repeated samples of the same unit as if they were independent. Resampling
uses an explicit `numpy.random.Generator` seed, so a report is reproducible. Pure numpy; no files, no printing.

    bootstrap_ci(values)                       95% percentile interval of the mean over units
    mean_t_ci(values)                          Student-t interval of the mean over a few units (training runs)
    jackknife_ci(statistic, n_units)           leave-one-unit-out interval of statistics of per-unit means (z or t)
    paired_effect(pos, neg)                    mean difference of paired units with its interval
    null_band(null_values)                     the (2.5%, 97.5%) band of a null distribution (>= 20 draws)
    zscore(value, null_values)                 distance from the null's mean in null standard deviations
    shuffled_label_null(stat, a, b, n)         a statistic under random relabelling of two groups
    auroc / auroc_ci(y, scores)                how well a score separates two classes, with its interval
    monotonic(coefs, values, ppl_ratios)       strictly increasing over the sweep, optionally under a fluency ceiling
    count_monotonic(monotonics, criterion)     how many sweeps (`monotonic` results) meet one of its criteria
    reduction_ci(treated, reference)           1 - mean(treated) / mean(reference), paired units, bootstrap
    reduction_jackknife_ci(treated, reference) the same over a few units (training runs), jackknife at t
    perplexity_ratio_ci(base_nll, ..., counts) a changed model's perplexity over the base's, per conversation
    pearson / pearson_ci                       correlation with a bootstrap interval over units
    within_groups_r(x, y, groups)              the correlation inside each group (e.g. polarity) and pooled within
    centre_within_groups(values, groups)       values minus their group's mean (the step both of the above share)
    permutation_r_null(x, y)                   band of r with the pairing shuffled across all units
    within_groups_null(x, y, groups)           band of the pooled within-group r with the pairing shuffled per group
    standardised_pooled_r(x, y, groups)        r over per-group standardised values, stratified bootstrap, per-group r
    spearman_brown(half_r)                     a half-size agreement stepped up to the full size
    within_groups_reliability(values, groups)  split-half reliability of per-row means once group means are removed
    attenuation_ceiling(rel_x, rel_y)          the largest r two measures of these reliabilities can show
    cohens_d(a, b)                             effect size of two groups (per column), pooled sd
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Callable, Sequence, TypedDict

import numpy as np

MIN_NULL_DRAWS = 20  # a null band from fewer random directions or shuffles is a line, not a band
DEFAULT_RESAMPLES = 2000
DEFAULT_SHUFFLES = 200  # pairings drawn for a shuffled-pairing null band of a correlation


class Interval(TypedDict):
    """`bootstrap_ci` and `pearson_ci`: an estimate with its 95% bootstrap interval over independent units. Studies
    keep these as plain dicts (metrics.json writes them as they are); the declaration says which keys exist."""

    estimate: float
    low: float
    high: float
    n: int  # units resampled


class Effect(Interval):
    """`paired_effect`: the mean paired change over units."""

    excludes_zero: bool  # n > 1 and the interval lies on one side of 0


class NullBand(TypedDict):
    """`null_band`: the central 95% of a null distribution (random directions, shuffles or latent sets)."""

    low: float
    high: float
    mean: float
    std: float
    n: int


def _finite_1d(name: str, values) -> np.ndarray:
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} has shape {x.shape}; expected one value per independent unit (1-D)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values ({int(np.sum(~np.isfinite(x)))} of {x.size}); expected "
                         "finite numbers")
    return x


def _has_spread(values: np.ndarray) -> bool:
    """Whether two of the values differ. Exact, unlike std() > 0: the std of copies of one float such as 0.1 is
    about 1e-17, not 0, while the std of the same copies centred is 0."""
    return bool(values.size and values.max() > values.min())


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level={level}; expected a confidence level in (0, 1), e.g. 0.95")
    return float(level)


def bootstrap_ci(values, *, statistic: Callable[[np.ndarray], float] = np.mean, level: float = 0.95,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `statistic` over independent units: {estimate, low, high, n}.

    With one unit the interval is the point itself (n says so)."""
    x = _finite_1d("values", values)
    level = _check_level(level)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value; got none")
    est = float(statistic(x))
    if x.size == 1:
        return {"estimate": est, "low": est, "high": est, "n": 1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(int(n_resamples), x.size))
    stats = np.asarray([statistic(x[i]) for i in idx], np.float64)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"estimate": est, "low": float(lo), "high": float(hi), "n": int(x.size)}


def auroc(y_true, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted 1/2)."""
    y, s = np.asarray(y_true, bool), np.asarray(scores, np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs both classes; got {len(pos)} positives and {len(neg)} negatives")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def auroc_ci(y_true, scores, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """`auroc` with a percentile bootstrap interval over the units (resamples with one class only are skipped):
    {estimate, low, high, n, n_pos}. How well a score reads a behaviour, e.g. a refusal score against whether the
    answer refuses: chance is 0.5."""
    y, s = np.asarray(y_true, bool), np.asarray(scores, np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true has shape {y.shape}, scores {s.shape}; expected equal 1-d shapes")
    est, level = auroc(y, s), _check_level(level)
    idx = np.random.default_rng(seed).integers(0, y.size, size=(int(n_resamples), y.size))
    stats = np.asarray([auroc(y[i], s[i]) for i in idx if 0 < y[i].sum() < y.size], np.float64)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"estimate": est, "low": float(lo), "high": float(hi), "n": int(y.size), "n_pos": int(y.sum())}


def t_critical(level: float, df: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= t) = level for T with `df` (integer >= 1) degrees of
    freedom, by bisection on the closed-form distribution of |T| for integer df."""
    level = _check_level(level)
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df={df!r}; expected an integer >= 1")
    lo, hi = 0.0, 1.0
    while _t_central_mass(hi, int(df)) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_central_mass(mid, int(df)) < level else (lo, mid)
    return 0.5 * (lo + hi)


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df: the finite series in cos(theta), theta = atan(t / sqrt(df))."""
    theta = float(np.arctan(t / np.sqrt(df)))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return float(s * total)
    if df == 1:
        return float(2 * theta / np.pi)
    term, total = np.cos(theta), np.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return float(2 / np.pi * (theta + s * total))


def mean_t_ci(values, *, level: float = 0.95) -> dict:
    """Mean of a few independent units with its Student-t interval: {estimate, low, high, n, se, df}.

    For units that are expensive to draw (independent training runs, of which a study has 3-10): a percentile
    bootstrap of so few values is too narrow, since it treats the sample's spread as the population's."""
    x = _finite_1d("values", values)
    if x.size == 0:
        raise ValueError("mean_t_ci needs at least one value; got none")
    est = float(x.mean())
    if x.size == 1:
        return {"estimate": est, "low": est, "high": est, "n": 1, "se": float("nan"), "df": 0}
    se = float(x.std(ddof=1) / np.sqrt(x.size))
    half = t_critical(level, x.size - 1) * se
    return {"estimate": est, "low": est - half, "high": est + half, "n": int(x.size), "se": se, "df": int(x.size - 1)}


def jackknife_ci(statistic: Callable[[np.ndarray], Sequence[float]], n_units: int, *, level: float = 0.95,
                 student_t: bool = False) -> dict:
    """Leave-one-unit-out jackknife interval of one or more statistics of a sample of `n_units` independent units:
    `statistic(indices)` computes them from the units at `indices`. Returns {estimate, se, low, high, n, left_out},
    each value an array over the statistics: estimate +- z * se, se^2 = (n-1)/n * sum_i (stat_-i - mean_-i)^2;
    left_out [n, statistics] holds each leave-one-out value (which units a statistic leans on). With `student_t`
    the critical value is Student's t with n - 1 degrees of freedom instead of z (a few units: training runs).

    Why not a bootstrap: for a statistic of per-unit means whose value depends on their noise (a correlation or
    a top-k overlap of two mean vectors), a resample with replacement averages fewer distinct units, and the
    noisier means pull the resampled statistic toward 0, so a percentile interval can sit below the estimate."""
    if n_units < 2:
        raise ValueError(f"jackknife_ci needs >= 2 units; got {n_units}")
    units = np.arange(n_units)
    est = np.asarray(statistic(units), np.float64)
    left_out = np.asarray([statistic(np.delete(units, i)) for i in units], np.float64)
    se = np.sqrt((n_units - 1) / n_units * ((left_out - left_out.mean(0)) ** 2).sum(0))
    z = t_critical(level, n_units - 1) if student_t else NormalDist().inv_cdf(0.5 + _check_level(level) / 2)
    return {"estimate": est, "se": se, "low": est - z * se, "high": est + z * se, "n": int(n_units),
            "left_out": left_out}


def paired_effect(pos, neg, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Effect:
    """Mean of pos[i] - neg[i] over paired units with its bootstrap interval; `excludes_zero` says whether the
    interval lies entirely on one side of 0 (the effect is distinguishable from none)."""
    p, q = _finite_1d("pos", pos), _finite_1d("neg", neg)
    if p.shape != q.shape:
        raise ValueError(f"pos has {p.size} units and neg {q.size}; expected paired units (equal counts)")
    ci = bootstrap_ci(p - q, level=level, n_resamples=n_resamples, seed=seed)
    return {**ci, "excludes_zero": bool(ci["n"] > 1 and (ci["low"] > 0 or ci["high"] < 0))}


def null_band(null_values, *, level: float = 0.95, min_draws: int = MIN_NULL_DRAWS) -> NullBand:
    """The central `level` band of a null distribution: {low, high, mean, std, n}. Needs >= `min_draws` draws."""
    x = _finite_1d("null_values", null_values)
    level = _check_level(level)
    if x.size < min_draws:
        raise ValueError(f"a null band needs at least {min_draws} draws (random directions or shuffles); got {x.size}")
    lo, hi = np.quantile(x, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"low": float(lo), "high": float(hi), "mean": float(x.mean()), "std": float(x.std(ddof=1)), "n": int(x.size)}


def outside_band(value: float, band: dict) -> bool:
    """Whether `value` lies outside a `null_band` (either side)."""
    return bool(value < band["low"] or value > band["high"])


def zscore(value: float, null_values, *, min_draws: int = MIN_NULL_DRAWS) -> float:
    """(value - mean(null)) / std(null); +-inf when the null has no spread and value differs from it."""
    band = null_band(null_values, min_draws=min_draws)
    diff = float(value) - band["mean"]
    if band["std"] > 0:
        return diff / band["std"]
    return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)


def shuffled_label_null(statistic: Callable[[np.ndarray, np.ndarray], float], a, b, *, n_shuffles: int = 100,
                        seed: int = 0) -> np.ndarray:
    """`statistic(group_a, group_b)` over `n_shuffles` random relabellings of the pooled units (group sizes kept):
    the null a discovery statistic is compared with. a, b: [n_a, ...], [n_b, ...]. The statistic may be a scalar
    or an array (e.g. a difference of mean vectors): the result is [n_shuffles, *its shape], float64."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"shuffled_label_null needs units in both groups; got {len(a)} and {len(b)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"groups have unit shapes {a.shape[1:]} and {b.shape[1:]}; expected equal")
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n_shuffles)):
        perm = rng.permutation(len(pooled))
        out.append(statistic(pooled[perm[:len(a)]], pooled[perm[len(a):]]))
    return np.asarray(out, np.float64)


MIN_MONOTONIC_RUN = 4  # the lenient criterion: increasing over >= 4 consecutive coefficients of both signs


def monotonic(coefs: Sequence[float], values: Sequence[float], ppl_ratios: Sequence[float] | None = None, *,
              max_ppl_ratio: float | None = None, min_run: int = MIN_MONOTONIC_RUN) -> dict:
    """Monotonicity of a steering curve, by the strict and the lenient criterion.

    Returns {increasing, decreasing, strict (either), fluent (every point's perplexity ratio <= max_ppl_ratio,
    True without a ceiling), strict_fluent (strict and fluent), coefs (sorted)}. With a ceiling, the curve is also
    judged only over the points that meet it (`strict_within_ceiling`, `n_within_ceiling`): effects are read at
    equal fluency cost; `increasing_within_ceiling` is the headline criterion: strictly increasing over those points,
    with >= 3 of them spanning both signs (without a ceiling: `increasing` over a sweep of both signs). Half sweeps: `neg` / `pos`, strictly increasing over c <= 0 / c >= 0. The lenient
    criterion: `run`, increasing over some >= min_run consecutive coefficients that include negative and positive
    ones (`run_coefs`, the longest such run; [] when none)."""
    c, v = np.asarray(coefs, np.float64), np.asarray(values, np.float64)
    if c.shape != v.shape or c.ndim != 1 or c.size < 2:
        raise ValueError(f"coefs {c.shape} and values {v.shape}; expected two equal-length 1-D sweeps of >= 2 points")
    if len(set(c.tolist())) != c.size:
        raise ValueError(f"coefs {c.tolist()} repeat a value; expected distinct coefficients")
    order = np.argsort(c)
    c, v = c[order], v[order]
    d = np.diff(v)
    res = {"increasing": bool(np.all(d > 0)), "decreasing": bool(np.all(d < 0)), "coefs": c.tolist()}
    res["strict"] = res["increasing"] or res["decreasing"]
    fluent_mask = np.ones(c.size, bool)
    if max_ppl_ratio is not None:
        if ppl_ratios is None:
            raise ValueError("max_ppl_ratio given without ppl_ratios; expected one perplexity ratio per coefficient")
        r = np.asarray(ppl_ratios, np.float64)
        if r.shape != c.shape:
            raise ValueError(f"ppl_ratios has {r.size} values for {c.size} coefficients; expected one each")
        fluent_mask = r[order] <= max_ppl_ratio
    res["fluent"] = bool(fluent_mask.all())
    res["strict_fluent"] = res["strict"] and res["fluent"]
    kept = v[fluent_mask]
    res["n_within_ceiling"] = int(fluent_mask.sum())
    res["strict_within_ceiling"] = bool(kept.size >= 2 and (np.all(np.diff(kept) > 0) or np.all(np.diff(kept) < 0)))
    kept_c = c[fluent_mask]
    res["increasing_within_ceiling"] = bool(kept.size >= 3 and np.all(np.diff(kept) > 0) and kept_c.min() < 0
                                            < kept_c.max())
    neg, pos = v[c <= 0], v[c >= 0]
    res["neg"] = bool(neg.size >= 2 and np.all(np.diff(neg) > 0))
    res["pos"] = bool(pos.size >= 2 and np.all(np.diff(pos) > 0))
    res["run_coefs"] = _longest_increasing_run(c, d > 0, min_run)
    res["run"] = bool(res["run_coefs"])
    return res


def _longest_increasing_run(c: np.ndarray, up: np.ndarray, min_run: int) -> list[float]:
    """The longest run of >= min_run sorted coefficients c[i..j] with c[i] < 0 < c[j] over which the curve rises
    (`up[k]`: it rises from point k to k + 1)."""
    best: list[float] = []
    for i in range(c.size):
        for j in range(i + min_run - 1, c.size):
            if c[i] < 0 < c[j] and np.all(up[i:j]) and j - i + 1 > len(best):
                best = [float(x) for x in c[i:j + 1]]
    return best


def count_monotonic(monotonics: Sequence[dict], criterion: str) -> int:
    """How many sweeps meet `criterion`, a boolean field of their `monotonic` results ("increasing": strictly over
    the whole sweep; "run": the lenient criterion; "increasing_within_ceiling": strictly over the fluent points; or
    a field the caller added, such as one combining it with a random band). A sweep without the field counts as not
    meeting it, so a count covers only the sweeps shown to pass."""
    return sum(bool(m.get(criterion, False)) for m in monotonics)


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length series (>= 3 values); NaN when either is constant."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    if x.size != y.size or x.size < 3:
        raise ValueError(f"pearson needs two equal-length series of >= 3 values; got {x.size} and {y.size}")
    xs, ys = x - x.mean(), y - y.mean()
    den = np.sqrt((xs ** 2).sum() * (ys ** 2).sum())
    return float((xs * ys).sum() / den) if den > 0 else float("nan")


def pearson_ci(x, y, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """Pearson r with a bootstrap interval over (x, y) units: {estimate, low, high, n}. Resamples where one
    series is constant are skipped; the interval is NaN when too few remain."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    est = pearson(x, y)
    rng = np.random.default_rng(seed)
    rs = []
    for idx in rng.integers(0, x.size, size=(int(n_resamples), x.size)):
        xi, yi = x[idx], y[idx]
        if _has_spread(xi) and _has_spread(yi):
            rs.append(pearson(xi, yi))
    if len(rs) < n_resamples // 2:
        return {"estimate": est, "low": float("nan"), "high": float("nan"), "n": int(x.size)}
    lo, hi = np.quantile(rs, [(1 - _check_level(level)) / 2, 1 - (1 - level) / 2])
    return {"estimate": est, "low": float(lo), "high": float(hi), "n": int(x.size)}


def ratio_of_means_ci(num, den, *, n_resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0) -> dict:
    """mean(num) / mean(den) for two independent sets of units (e.g. out-of-domain and in-domain questions), with a
    percentile bootstrap that resamples each set on its own. {estimate, low, high, n_num, n_den, n}."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.size < 2 or b.size < 2:
        raise ValueError(f"num {a.shape} and den {b.shape}; expected two 1-D sets of >= 2 units")
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, (n_resamples, a.size))].mean(1)
    rb = b[rng.integers(0, b.size, (n_resamples, b.size))].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ra / rb
    ratios = ratios[np.isfinite(ratios)]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2]) if ratios.size else (np.nan, np.nan)
    est = float(a.mean() / b.mean()) if b.mean() != 0 else float("nan")
    return {"estimate": est, "low": float(lo), "high": float(hi), "n_num": int(a.size), "n_den": int(b.size),
            "n": int(a.size + b.size)}


def reduction_ci(treated, reference, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> dict:
    """How much of the reference effect a treatment removes: 1 - mean(treated) / mean(reference) over paired units
    (e.g. per-question shifts of a steered and a plain fine-tune, each beyond a control), with a percentile bootstrap
    that resamples the units jointly, so each resample keeps the pairing. {estimate, low, high, n}; 1 is full
    removal, 0 none, below 0 a larger effect. A ratio of means, not a mean of per-unit ratios, which units with a
    reference near 0 would throw anywhere. Unlike `ratio_of_means_ci` (two independent sets, resampled apart),
    treated[i] and reference[i] are the same unit. Arrays keep their dtype (the means are taken in it)."""
    treated, reference = np.asarray(treated), np.asarray(reference)
    if treated.ndim != 1 or treated.shape != reference.shape:
        raise ValueError(f"treated {treated.shape} and reference {reference.shape}; expected paired units (two 1-D "
                         "arrays of equal length)")
    idx = np.arange(reference.size, dtype=np.float64)
    stat = lambda i: 1.0 - treated[i.astype(int)].mean() / reference[i.astype(int)].mean()  # noqa: E731
    return bootstrap_ci(idx, statistic=stat, level=level, n_resamples=n_resamples, seed=seed)


def reduction_jackknife_ci(treated, reference, *, level: float = 0.95) -> dict:
    """`reduction_ci` over a few expensive paired units (training runs: each run's treated and reference effect):
    1 - mean(treated) / mean(reference) with a leave-one-unit-out jackknife interval at Student-t critical values
    (`jackknife_ci`), since a percentile bootstrap of 3-10 units is too narrow (see `mean_t_ci`).
    {estimate, low, high, n, se}; with one unit the interval is the point and `se` is absent. A ratio of means,
    which a unit whose reference effect is near 0 cannot send to any value, unlike a mean of per-unit ratios."""
    s, p = np.asarray(treated, np.float64), np.asarray(reference, np.float64)
    est = float(1.0 - s.mean() / p.mean())
    if s.size < 2:
        return {"estimate": est, "low": est, "high": est, "n": int(s.size)}
    ci = jackknife_ci(lambda idx: [1.0 - s[idx].mean() / p[idx].mean()], s.size, level=level, student_t=True)
    return {"estimate": est, "low": float(ci["low"][0]), "high": float(ci["high"][0]), "n": int(s.size),
            "se": float(ci["se"][0])}


def perplexity_ratio_ci(base_nll, base_counts, nll, counts, *, level: float = 0.95,
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Perplexity of a changed model (a fine-tune, an edit) over the base model's on the same held-out
    conversations, from each conversation's summed NLL and token count per condition (as
    `rollouts.conversation_nll` returns them): exp of the mean over conversations of the per-token NLL change, with
    a bootstrap interval over conversations (the units), mapped through exp. {ratio, low, high, n}. Each
    conversation weighs the same whatever its length (a conversation with no tokens counts as 0 change);
    `measures.paired_ce_change` is the token-weighted percentage change instead."""
    ci = bootstrap_ci(nll / np.maximum(counts, 1) - base_nll / np.maximum(base_counts, 1), level=level,
                      n_resamples=n_resamples, seed=seed)
    return {"ratio": float(np.exp(ci["estimate"])), "low": float(np.exp(ci["low"])), "high": float(np.exp(ci["high"])),
            "n": ci["n"]}


def ranks(x) -> np.ndarray:
    """0-based ranks of x, ties sharing their mean rank."""
    _, inv, counts = np.unique(np.asarray(x, np.float64), return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2.0)[inv]


def _groups_like(groups, x: np.ndarray, name: str = "values") -> np.ndarray:
    g = np.asarray(groups)
    if g.shape != x.shape:
        raise ValueError(f"{name} has shape {x.shape} and groups {g.shape}; expected one group label per unit")
    return g


def centre_within_groups(values, groups) -> np.ndarray:
    """values minus the mean of their group: what is left once the difference between groups is removed. Both the
    pooled within-group r and its shuffled null are computed on values centred this way."""
    x = _finite_1d("values", values)
    g = _groups_like(groups, x)
    out = x.copy()
    for label in np.unique(g):
        m = g == label
        out[m] -= x[m].mean()
    return out


def within_groups_r(x, y, groups, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """The correlation that is not the difference between groups (e.g. positive vs negative system prompts).

    Returns {overall, pooled_within, per_group}: `overall` is r over all units; `pooled_within` is r after
    subtracting each group's means from x and y (the within-cluster association), with a bootstrap interval;
    `per_group[g]` is r inside group g (None when it has < 3 units or no spread)."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape}; expected one (x, y) pair per unit")
    g = _groups_like(groups, x, "x")
    per_group = {}
    for label in np.unique(g):
        m = g == label
        ok = m.sum() >= 3 and _has_spread(x[m]) and _has_spread(y[m])
        per_group[str(label)] = pearson(x[m], y[m]) if ok else None
    xc, yc = centre_within_groups(x, g), centre_within_groups(y, g)
    return {"overall": pearson_ci(x, y, level=level, n_resamples=n_resamples, seed=seed),
            "pooled_within": pearson_ci(xc, yc, level=level, n_resamples=n_resamples, seed=seed),
            "per_group": per_group}


def permutation_r_null(x, y, *, n_shuffles: int = DEFAULT_SHUFFLES, seed: int = 0) -> dict:
    """`null_band` of Pearson r with y's pairing to x shuffled across all units: the r that unrelated pairs give at
    this n. Shuffles that leave a constant series (r NaN) are dropped."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape}; expected one (x, y) pair per unit")
    rng = np.random.default_rng(seed)
    rs = [pearson(x, y[rng.permutation(y.size)]) for _ in range(int(n_shuffles))]
    return null_band([r for r in rs if np.isfinite(r)])


def within_groups_null(x, y, groups, *, n_shuffles: int = DEFAULT_SHUFFLES, seed: int = 0) -> dict:
    """`null_band` of the pooled within-group r (x and y centred per group, `centre_within_groups`) with y shuffled
    inside each group only: the r that unrelated pairings give when units are exchangeable within a group but not
    between groups (e.g. fine-tunes of one trait). Between-group differences cannot enter it."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape}; expected one (x, y) pair per unit")
    g = _groups_like(groups, x, "x")
    xc, yc = centre_within_groups(x, g), centre_within_groups(y, g)
    members = [np.flatnonzero(g == label) for label in np.unique(g)]
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(int(n_shuffles)):
        shuffled = yc.copy()
        for idx in members:
            shuffled[idx] = yc[rng.permutation(idx)]
        rs.append(pearson(xc, shuffled))
    return null_band([r for r in rs if np.isfinite(r)])


def spearman_brown(half_r):
    """The agreement of two full-size samples predicted from that of two half-size ones (Spearman-Brown),
    2r / (1 + |r|): the usual 2r / (1 + r) for r >= 0, mirrored for r < 0 so that the result stays in [-1, 1]."""
    r = np.asarray(half_r, np.float64)
    return 2 * r / (1 + np.abs(r))


def within_groups_reliability(values, groups, *, n_splits: int = 200, seed: int = 0) -> dict | None:
    """How reproducible the differences between rows' means are once each group's mean is removed: the ceiling that
    noise puts on a within-group correlation of those means with anything else.

    values [R, U]: R rows (e.g. system prompts), each the mean over U units (e.g. questions); NaN marks a unit not
    measured for that row. groups [R]. The units are split at random into two halves; each half gives every row's
    mean over its finite units, centred within groups (`centre_within_groups`); the two halves' r across rows is
    stepped up to the full size by Spearman-Brown, 2r / (1 + |r|). Rows lacking a unit in either half are left out
    of that split. Returns dict(half, reliability: means over splits; low, high: 2.5% and 97.5% of the stepped-up
    value over splits; n_rows, n_units, n_splits), or None with fewer than 2 units or 3 usable rows."""
    x = np.asarray(values, np.float64)
    if x.ndim != 2:
        raise ValueError(f"values has shape {x.shape}; expected [rows, units]")
    g = np.asarray(groups)
    if g.shape != x.shape[:1]:
        raise ValueError(f"groups has shape {g.shape} for {x.shape[0]} rows; expected one group label per row")
    if n_splits < 1:
        raise ValueError(f"n_splits={n_splits}; expected >= 1")
    n_units = x.shape[1]
    if n_units < 2:
        return None
    rng = np.random.default_rng(seed)
    half = []
    for _ in range(n_splits):
        first = np.zeros(n_units, bool)
        first[rng.permutation(n_units)[:n_units // 2]] = True
        a, b = (_row_means(x[:, cols]) for cols in (first, ~first))
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3:
            continue
        r = pearson(centre_within_groups(a[ok], g[ok]), centre_within_groups(b[ok], g[ok]))
        if np.isfinite(r):
            half.append(r)
    if not half:
        return None
    half = np.asarray(half)
    stepped = spearman_brown(half)
    return {"half": float(half.mean()), "reliability": float(stepped.mean()),
            "low": float(np.percentile(stepped, 2.5)), "high": float(np.percentile(stepped, 97.5)),
            "n_rows": int(x.shape[0]), "n_units": int(n_units), "n_splits": int(len(half))}


def finite_mean(values) -> float:
    """The mean of the finite values; NaN when there are none (a condition whose rows carry no value)."""
    x = np.asarray(values, np.float64)
    return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")


def _row_means(x: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries; NaN for a row with none."""
    finite = np.isfinite(x)
    counts = finite.sum(1)
    sums = np.where(finite, x, 0.0).sum(1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def attenuation_ceiling(rel_x: float, rel_y: float) -> float:
    """The largest correlation two measures with these reliabilities are expected to show even if what they
    measure were perfectly correlated (Spearman's attenuation: observed r = true r x sqrt(rel_x x rel_y)). A
    negative reliability counts as 0."""
    return float(np.sqrt(max(float(rel_x), 0.0) * max(float(rel_y), 0.0)))


MIN_GROUP_UNITS = 3  # fewer units in a group carry no correlation inside it (two points always lie on a line)
STANDARDISED_POOLED_R = "pooled r of per-group standardised values"


def standardise_within_groups(values, groups) -> np.ndarray:
    """(values - group mean) / group standard deviation (ddof 0), per group. Raises on a group without spread."""
    x = _finite_1d("values", values)
    g = _groups_like(groups, x)
    out = centre_within_groups(x, g)
    for label in np.unique(g):
        m = g == label
        sd = out[m].std()
        if not (_has_spread(x[m]) and sd > 0):
            raise ValueError(f"group {label!r} has no spread ({int(m.sum())} equal values); cannot standardise it")
        out[m] /= sd
    return out


def standardised_pooled_r(x, y, groups, *, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                          n_shuffles: int = DEFAULT_SHUFFLES, seed: int = 0) -> dict | None:
    """Pearson r over all units after standardising x and y inside each group, with a stratified bootstrap interval
    and a within-group shuffled null.

    Why: when each group (e.g. a trait) has its own scale on x and y (its own vector norm, its own score range), the
    raw pooled r mixes those scales with the relation and can fall inside its null while every group's own r is
    high; the within-group relation is what is claimed (Chen et al. 2025 report per-trait r). Standardising makes
    the statistic invariant to any per-group positive affine rescaling of x or y; it equals the per-group r averaged
    with weights n_g / n.

    Groups with fewer than `MIN_GROUP_UNITS` units or no spread in x or y carry no within-group relation and are
    left out (listed in `dropped_groups`); None when no group remains. The interval resamples units inside each kept
    group (stratified: every resample keeps each group's size) and re-standardises every resample; resamples where
    a group has no spread are skipped (the interval is NaN when fewer than half remain). The null shuffles y inside
    each group (`within_groups_null` on the standardised values, whose centring leaves them unchanged), which is the
    exact permutation null of this statistic.

    Returns {statistic, r: {estimate, low, high, n}, null, outside_null, n, n_groups, per_group, dropped_groups,
    n_valid_resamples}; per_group[g] is {estimate, n} with low / high where n >= 4 (a bootstrap over three units is
    degenerate)."""
    x, y = _finite_1d("x", x), _finite_1d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape}; expected one (x, y) pair per unit")
    g = _groups_like(groups, x, "x")
    level = _check_level(level)
    kept, dropped = _groups_with_a_relation(x, y, g)
    if not kept:
        return None
    sel = np.concatenate([idx for _, idx in kept])
    xs, ys, gs = x[sel], y[sel], g[sel]
    zx, zy = standardise_within_groups(xs, gs), standardise_within_groups(ys, gs)
    est = pearson(zx, zy) if zx.size >= 3 else float("nan")
    rs = _stratified_standardised_rs(xs, ys, gs, [label for label, _ in kept], n_resamples, seed)
    lo, hi = (np.quantile(rs, [(1 - level) / 2, 1 - (1 - level) / 2]) if len(rs) >= n_resamples // 2
              else (np.nan, np.nan))
    null = within_groups_null(zx, zy, gs, n_shuffles=n_shuffles, seed=seed)
    per_group = {}
    for label, idx in kept:
        if idx.size >= 4:
            per_group[str(label)] = pearson_ci(x[idx], y[idx], level=level, n_resamples=n_resamples, seed=seed)
        else:
            per_group[str(label)] = {"estimate": pearson(x[idx], y[idx]), "n": int(idx.size)}
    return {"statistic": STANDARDISED_POOLED_R, "r": {"estimate": est, "low": float(lo), "high": float(hi),
                                                      "n": int(sel.size)},
            "null": null, "outside_null": outside_band(est, null), "n": int(sel.size), "n_groups": len(kept),
            "per_group": per_group, "dropped_groups": [str(label) for label, _ in dropped],
            "n_valid_resamples": len(rs)}


def _groups_with_a_relation(x, y, g) -> tuple[list, list]:
    """(kept, dropped) lists of (label, unit indices): a group is kept with >= MIN_GROUP_UNITS units and spread in
    both x and y, the least that a within-group correlation needs."""
    kept, dropped = [], []
    for label in np.unique(g):
        idx = np.flatnonzero(g == label)
        ok = idx.size >= MIN_GROUP_UNITS and _has_spread(x[idx]) and _has_spread(y[idx])
        (kept if ok else dropped).append((label, idx))
    return kept, dropped


def _stratified_standardised_rs(xs, ys, gs, labels, n_resamples: int, seed: int) -> list[float]:
    """The standardised pooled r of each stratified bootstrap resample (units redrawn inside each group, every group
    keeping its size), skipping resamples where a group has no spread left to standardise."""
    strata = [np.flatnonzero(gs == label) for label in labels]
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(int(n_resamples)):
        picks = [rng.choice(s, size=s.size, replace=True) for s in strata]
        if not all(_has_spread(xs[p]) and _has_spread(ys[p]) for p in picks):
            continue
        idx = np.concatenate(picks)
        rs.append(pearson(standardise_within_groups(xs[idx], gs[idx]), standardise_within_groups(ys[idx], gs[idx])))
    return rs


def percentile_rank(value: float, population) -> float:
    """Fraction of `population` strictly below `value` (0..1): where the default Assistant sits among roles."""
    p = _finite_1d("population", population)
    if p.size == 0:
        raise ValueError("percentile_rank needs a non-empty population")
    return float(np.mean(p < float(value)))


def cohens_d(a, b) -> np.ndarray:
    """Cohen's d of two groups: (mean_a - mean_b) / pooled sd (ddof=1), per column of a [n_a, ...] vs b [n_b, ...]
    (a 0-d array for 1-D groups). 0 where both groups are constant and equal, +-inf where constant but different,
    so that ranking many columns (SAE latents) puts a perfect separation first and a dead column in the middle."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"Cohen's d needs at least 2 values per group; got {na} and {nb}")
    diff = a.mean(0) - b.mean(0)
    pooled = np.sqrt(((na - 1) * a.var(0, ddof=1) + (nb - 1) * b.var(0, ddof=1)) / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 1e-12, diff / np.maximum(pooled, 1e-12),
                        np.where(np.abs(diff) > 1e-12, np.sign(diff) * np.inf, 0.0))
