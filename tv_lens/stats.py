"""Significance against a null: Beta tails, moment-matched Betas and Benjamini–Hochberg.

Every share tv_lens reports lies in ``[0, 1]``. Under a unit's null (``tv_lens.nulls``) a share
either follows a Beta distribution exactly (a neuron's ``cos²``) or has known mean and variance,
and its upper tail is taken from the Beta with those two moments. A plain Monte Carlo p-value
cannot go below ``1/(samples + 1)``, too coarse once thousands of units are corrected together.

Everything here is float64 torch (no scipy): the regularized incomplete beta function by its
continued fraction (modified Lentz), checked against ``mpmath`` in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

_TINY = 1e-300
_MAX_ITER = 4000


def _continued_fraction(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """The continued fraction of ``I_x(a, b)`` (Numerical Recipes' ``betacf``), vectorised; it
    converges fast for ``x < (a + 1)/(a + b + 2)``, where the callers use it."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)
    d = 1.0 / d
    h = d.clone()
    done = torch.zeros_like(x, dtype=torch.bool)
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = torch.where(d.abs() < _TINY, torch.full_like(d, _TINY), d)
            c = 1.0 + aa / c
            c = torch.where(c.abs() < _TINY, torch.full_like(c, _TINY), c)
            d = 1.0 / d
            step = d * c
            h = torch.where(done, h, h * step)
        done = done | ~((step - 1.0).abs() >= 1e-15)  # converged (or no longer finite)
        if bool(done.all()):
            break
    return h


def beta_sf(x: Tensor | float | int, a: Tensor | float | int,
            b: Tensor | float | int) -> Float[Tensor, "..."]:
    """``P(X ≥ x)`` for ``X ~ Beta(a, b)`` (float64, elementwise, broadcasting). Accurate in
    the upper tail down to ~1e-300: the small side is always computed directly."""
    x, a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (x, a, b))
    x, a, b = torch.broadcast_tensors(x, a, b)
    xc = x.clamp(0.0, 1.0)
    inner = (xc > 0) & (xc < 1)
    xs = torch.where(inner, xc, torch.full_like(xc, 0.5))
    log_front = (torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
                 + a * torch.log(xs) + b * torch.log1p(-xs))
    front = torch.exp(log_front)
    lower_side = xs < (a + 1.0) / (a + b + 2.0)
    # one continued fraction per element: I_x(a, b) where x is on the lower side, else
    # I_{1−x}(b, a) = 1 − I_x(a, b), so the small tail is always computed directly
    cf = _continued_fraction(torch.where(lower_side, a, b), torch.where(lower_side, b, a),
                             torch.where(lower_side, xs, 1 - xs))
    sf = torch.where(lower_side, 1.0 - front * cf / a, front * cf / b)
    sf = torch.where(xc <= 0, torch.ones_like(sf), sf)
    sf = torch.where(xc >= 1, torch.zeros_like(sf), sf)
    return sf.clamp(0.0, 1.0)


@dataclass(frozen=True)
class NullMoments:
    """Mean and variance of a share under a unit's null (one entry per unit)."""

    mean: Float[Tensor, "n"]
    var: Float[Tensor, "n"]

    def beta(self) -> tuple[Tensor, Tensor]:
        """``(a, b)`` of the Beta with these moments (``var`` clipped below ``mean(1 − mean)``)."""
        mean = self.mean.clamp(1e-12, 1 - 1e-12)
        var = torch.minimum(self.var.clamp(min=1e-300), mean * (1 - mean) * (1 - 1e-9))
        common = mean * (1 - mean) / var - 1.0
        return mean * common, (1 - mean) * common

    def test(self, observed: Float[Tensor, "n"]) -> tuple[Tensor, Tensor]:
        """``(z, p)``: standardised share and upper-tail p-value from the matched Beta; NaN
        where ``observed`` is NaN. A null with no variance gives p = 0 above its mean, else 1."""
        obs = torch.as_tensor(observed, dtype=torch.float64)
        sd = self.var.clamp(min=0).sqrt()
        z = (obs - self.mean) / sd
        a, b = self.beta()
        p = beta_sf(obs.nan_to_num(0.0), a, b)
        degenerate = ~(self.var > 0)
        p = torch.where(degenerate, (obs <= self.mean).double(), p)
        nan = torch.isnan(obs)
        return torch.where(nan, torch.nan, z), torch.where(nan, torch.nan, p)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of one family; NaNs stay NaN and do not
    count towards the family size."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    n = int(ok.sum())
    if n == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * n / np.arange(1, n + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = ranked
    q[ok] = out
    return q
