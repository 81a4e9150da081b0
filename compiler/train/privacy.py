"""DP-SGD (issue 16, item 2): the private gradient of a batch, and its privacy accounting.

The step (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1): each
sample's gradient (``per_example_grads`` of the generated module), all parameters together, is
scaled to an L2 norm of at most C; the scaled gradients are summed, Gaussian noise of standard
deviation sigma*C is added to every coordinate, and the sum is divided by the batch size.

The accounting is the Renyi-DP accountant of the sampled Gaussian mechanism (Mironov, Talwar and
Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3), at
integer orders alpha = 2, 3, ..., 256. One step, each sample included with probability q,
noise multiplier sigma, has

    RDP(alpha) = 1/(alpha - 1) * log( sum_{k=0..alpha} binom(alpha, k) (1 - q)^(alpha - k) q^k
                                      * exp((k^2 - k) / (2 sigma^2)) )

(alpha/(2 sigma^2) when q = 1: the Gaussian mechanism). T steps compose by addition: T*RDP(alpha).
The guarantee (epsilon, delta) is the best over the orders of the conversion of Balle et al.
2020 ("Hypothesis Testing Interpretations and Renyi Differential Privacy", Theorem 21):

    epsilon = T*RDP(alpha) + log((alpha - 1)/alpha) - (log(delta) + log(alpha)) / (alpha - 1)

which is never worse than Mironov's (2017) T*RDP(alpha) + log(1/delta)/(alpha - 1). These are the
formulas of Google's dp_accounting (RdpAccountant) at integer orders; tests/test_privacy.py
checks them against its published test values.

The accountant assumes that each step's batch is a Poisson sample of the data with q =
batch/n. ``bpc train`` draws shuffled batches of a fixed size instead, as most DP-SGD
implementations do; the figure it reports is the customary approximation for that sampling.
"""
from __future__ import annotations

import math

import numpy as np

ORDERS = tuple(range(2, 257))


def _log_add(a, b):
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def rdp_sampled_gaussian(q, sigma, order):
    """The Renyi DP of one step of the sampled Gaussian mechanism at the integer ``order`` >= 2:
    sampling rate ``q`` in [0, 1], noise multiplier ``sigma`` >= 0 (inf when sigma is 0 and q > 0)."""
    if not isinstance(order, int) or order < 2:
        raise ValueError(f"the order must be an integer >= 2, got {order!r}")
    if not 0 <= q <= 1:
        raise ValueError(f"the sampling rate must lie in [0, 1], got {q!r}")
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return order / (2 * sigma ** 2)
    log_q, log_1q = math.log(q), math.log1p(-q)
    total = -math.inf
    for k in range(order + 1):
        term = (math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
                + k * log_q + (order - k) * log_1q + (k * k - k) / (2 * sigma ** 2))
        total = _log_add(total, term)
    return total / (order - 1)


def epsilon(q, sigma, steps, delta, orders=ORDERS):
    """(epsilon, best order) of ``steps`` steps of the sampled Gaussian mechanism at ``delta``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    if steps == 0 or q == 0:
        return 0.0, orders[0]
    best, best_order = math.inf, orders[0]
    for a in orders:
        rdp = steps * rdp_sampled_gaussian(q, sigma, a)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best:
            best, best_order = eps, a
    return max(best, 0.0), best_order


def private_gradient(per_example, clip, noise, rng):
    """(the DP-SGD gradient of a batch, the fraction of samples whose gradient was clipped):
    ``per_example`` maps each parameter to its per-sample gradients (batch first); each sample's
    gradient over all parameters is scaled to an L2 norm of at most ``clip``, the sum gets
    N(0, (noise*clip)^2) in every coordinate from ``rng``, and is divided by the batch size."""
    names = list(per_example)
    first = np.asarray(per_example[names[0]])
    n = first.shape[0]
    sq = np.zeros(n)
    for k in names:
        g = np.asarray(per_example[k], dtype=np.float64).reshape(n, -1)
        sq += np.einsum("ij,ij->i", g, g)
    norms = np.sqrt(sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.minimum(1.0, clip / norms)
    scale[norms == 0] = 1.0
    out = {}
    for k in names:
        g = np.asarray(per_example[k])
        summed = np.tensordot(scale.astype(g.dtype), g, axes=(0, 0))
        noisy = summed + rng.normal(0.0, noise * clip, size=g.shape[1:])
        out[k] = (noisy / n).astype(g.dtype)
    return out, float(np.mean(norms > clip))
