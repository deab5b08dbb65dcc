"""Tolerances for comparing two fp32 computations, derived from how rounding error accumulates.

Higham, *Accuracy and Stability of Numerical Algorithms* (2002) §3.1: a sum or dot product of n terms,
evaluated in ANY order, is within gamma(n) * sum|x_i| of the exact value, gamma(n) = n*u / (1 - n*u),
u = 2^-24 the fp32 unit roundoff. Because the bound holds for every order, a tolerance set from it cannot
be broken by another XLA tiling, vectorisation width, thread count or device count. (The typical error
is about sqrt(n)*u*sum|x_i|, 10-50x below these bounds on the shapes the tests use.)

Through a network the bound is applied contraction by contraction along the longest dependency path:
activations are normalised (RMSNorm / softmax), so each contraction's sum|terms| stays of the order of
the magnitudes the test compares, and the relative errors of the stages add. exp, rsqrt and the like
are correctly rounded to within a few ulps (counted as `ELEMENTWISE` terms per stage).
"""
from __future__ import annotations

import numpy as np

U = 2.0 ** -24  # fp32 unit roundoff
ELEMENTWISE = 4  # ulps allowed for one transcendental (exp, log, rsqrt, sigmoid) in XLA's CPU kernels


def gamma(n: int) -> float:
    """Higham's gamma_n: the worst relative error of an n-term sum in any order."""
    return n * U / (1.0 - n * U)


def sum_tol(n: int, abs_sum, sides: int = 2) -> float:
    """|a - b| bound for two evaluations (`sides` of them, each in its own order) of an n-term sum."""
    return sides * gamma(n) * float(np.max(np.abs(abs_sum)))


def chain_tol(scale, lengths, sides: int = 2) -> float:
    """Bound for values of magnitude <= `scale` reached through contractions of the given lengths."""
    return sides * gamma(int(sum(lengths))) * float(np.max(np.abs(scale)))


def transformer_lengths(cfg, context: int) -> list[int]:
    """Contraction lengths (plus elementwise ulps) along one token's path through the model to its logits.

    Per layer: RMSNorm (a d-term mean square), the q/k/v projections (d), the scores (head_dim), the
    softmax's normaliser and the probability-weighted sum of values (context each), the output
    projection (heads*head_dim), the second norm (d), w1/w3 (d), w2 (ffn); then the final norm and the
    output head (d each).
    """
    per_layer = [cfg.d_model, cfg.d_model, cfg.head_dim, context, context, cfg.n_heads * cfg.head_dim,
                 cfg.d_model, cfg.d_model, cfg.ffn_dim, 6 * ELEMENTWISE]
    return per_layer * cfg.n_layers + [cfg.d_model, cfg.d_model, ELEMENTWISE]


def cross_entropy_tol(logits, count: int, z_loss_weight: float = 0.0, sides: int = 1) -> float:
    """Bound on a mean over `count` tokens of nll + w*lse^2 computed in fp32 from `logits` [..., V].

    logsumexp: x - max is exact to u*range, each exp to ELEMENTWISE ulps, the V-term sum to gamma(V);
    the log turns that relative error into an absolute one, plus u*|lse|. The z-term multiplies the
    error by 2w|lse|, and the mean over `count` tokens adds gamma(count) of the largest term. With
    sides=1 the other side is an exact (float64) reference.
    """
    lg = np.asarray(logits, np.float64)
    top = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(-1)) + top[..., 0]
    spread = float((lg.max(-1) - lg.min(-1)).max())
    d_lse = gamma(lg.shape[-1] + 2 * ELEMENTWISE) * (1 + spread + float(np.abs(lse).max()))
    term = float((np.abs(lse) + np.abs(lg).max(-1) + z_loss_weight * lse ** 2).max())
    return sides * (d_lse * (1 + 2 * z_loss_weight * float(np.abs(lse).max())) + gamma(count) * term)


def attention_tol(q, k, v, cot=None, sides: int = 2) -> float:
    """Bound on softmax(q k^T / sqrt(h)) v (or, with `cot`, on its q/k/v gradients) over t keys.

    A score is an h-term dot: absolute error gamma(h)*max|q||k|/sqrt(h), which is a relative error of
    each probability, as is the t-term normaliser's gamma(t). The output sums t probability-weighted
    values (gamma(t) of max|v|). The backward adds the h-term dP = cot v^T, the t-term row sums of
    softmax's Jacobian and the t-term products back into q, k, v, all scaled by max|cot| and by the
    largest of h*|q|*|k|*|v| that those products reach.
    """
    q, k, v = (np.abs(np.asarray(x, np.float64)) for x in (q, k, v))
    h, t = q.shape[-1], k.shape[1]
    scores = q.max() * k.max() * np.sqrt(h)  # |q||k|^T / sqrt(h), every entry at most this
    d_prob = 2 * gamma(h) * scores + gamma(t + 2 * ELEMENTWISE)
    if cot is None:
        return sides * (d_prob + gamma(t)) * v.max()
    scale = float(np.abs(cot).max()) * max(1.0, h * v.max() * max(q.max(), k.max(), 1.0)) * (1 + 2 * scores)
    return sides * (d_prob + gamma(h + 3 * t)) * scale
