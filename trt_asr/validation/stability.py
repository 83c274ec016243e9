"""Error trend over a long stream: least-squares slope of the per-chunk error with its 95 % confidence interval,
and the stability plot (error per chunk + fitted trend).

A carried cache that accumulates error shows as a positive slope whose interval excludes 0; the gate asks that even
the interval's upper end, extrapolated over the run, stays below the tolerance (``growth_ci95_hi <= max_growth``).
"""

from __future__ import annotations

import math

import numpy as np


def _t_quantile_975(dof: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except Exception:  # scipy is optional: normal approximation, slightly widened for small samples
        return 1.96 + (2.5 / dof if dof > 0 else math.inf)


def error_trend(errors) -> dict:
    """Fit errors[k] ~ intercept + slope * k. Returns slope, its 95 % CI, intercept, and the growth over the run
    (slope * (n - 1)) with the CI's upper end."""
    y = np.asarray(errors, dtype=np.float64)
    y = y[np.isfinite(y)]
    n = y.size
    if n < 3:
        return {"n": int(n), "slope": 0.0, "slope_ci95": [0.0, 0.0], "intercept": float(y.mean()) if n else 0.0,
                "growth": 0.0, "growth_ci95_hi": 0.0}
    x = np.arange(n, dtype=np.float64)
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = ((x - xm) * (y - ym)).sum() / sxx
    intercept = ym - slope * xm
    resid = y - (intercept + slope * x)
    se = math.sqrt((resid ** 2).sum() / (n - 2) / sxx)
    half = _t_quantile_975(n - 2) * se
    lo, hi = slope - half, slope + half
    return {"n": int(n), "slope": float(slope), "slope_ci95": [float(lo), float(hi)], "intercept": float(intercept),
            "growth": float(slope * (n - 1)), "growth_ci95_hi": float(max(hi, 0.0) * (n - 1))}


def plot_stability(per_chunk: dict[str, list], trend: dict, path, title: str = "", tol: float | None = None) -> str:
    """PNG: per-chunk max abs error of each output (log scale) and the fitted trend of the gated metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, errs in per_chunk.items():
        e = np.asarray(errs, dtype=np.float64)
        ax.plot(np.arange(e.size), np.maximum(e, 1e-12), lw=0.8, label=name)
    n = trend.get("n", 0)
    if n:
        x = np.arange(n)
        ax.plot(x, np.maximum(trend["intercept"] + trend["slope"] * x, 1e-12), "k--", lw=1.5,
                label=f"trend: slope {trend['slope']:.2e}/chunk (95% CI {trend['slope_ci95'][0]:.1e} .. "
                      f"{trend['slope_ci95'][1]:.1e})")
    if tol:
        ax.axhline(tol, color="r", lw=1, ls=":", label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("chunk")
    ax.set_ylabel("max abs error")
    ax.set_title(title or "streaming parity: error per chunk")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
