"""Cheap per-layer signals that might predict a layer's RL contribution before any training, and how
well they do against a measured scan.

Each signal is one number per decoder layer, oriented so that higher predicts a larger contribution
(the orientation is fixed here, a priori, not fitted to any scan):

- ``block_influence``: 1 - mean cosine between a layer's input and output hidden states over the task's
  prompt tokens (ShortGPT's "block influence", Men et al. 2024): how much the layer changes the residual
  stream;
- ``cka_influence``: 1 - linear CKA (Kornblith et al. 2019) between the same input and output token
  representations: a change of geometry rather than of direction;
- ``skip_drop``: the base model's task accuracy minus its accuracy with the layer skipped (the layer
  replaced by the identity);
- ``grad_norm``: the norm of the layer's mean GRPO gradient over one batch at the base model, relative to
  the norm of its weights;
- ``grad_snr``: signal-to-noise of that gradient across the batch's groups: the squared norm of the mean
  over the variance of the mean (trace of the groups' covariance / number of groups);
- ``grad_sign_agreement``: the mean over the layer's parameters of |mean over groups of sign(gradient)|
  (1 when every group pushes every weight the same way, ~0 for noise);
- ``spectrum_snr``: the weights' own signal-to-noise, as Spectrum (Hartford et al. 2024) measures it: for
  each matrix, the sum of singular values above the Marchenko-Pastur bulk edge over the sum of those below,
  with the noise scale estimated robustly from the singular values' interquartile range; each matrix kind
  (q, k, v, o, gate, ...) is z-scored across layers, and a layer's score is the mean over its matrices;
- ``position``: -|relative depth - 0.5|, the "middle layers" baseline every signal must beat.

The scoring functions compare a signal with a measured profile: Spearman's rho with an exact or
permutation p-value, top-k overlap against what chance gives, the regret of picking the predicted best
layer, and the rank correlation left after controlling for depth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .rank import rank_correlation

# ----------------------------------------------------------------------------------- representation signals


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """1 - mean cosine similarity of ``[N, D]`` input and output token vectors (row by row)."""
    cosine = torch.nn.functional.cosine_similarity(inputs.double(), outputs.double(), dim=-1)
    return float(1 - cosine.mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``[N, D]`` representations of the same N tokens: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F)
    with every feature centred over the tokens. 1 for representations equal up to rotation and scale."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def cka_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    return 1 - linear_cka(inputs, outputs)


# ------------------------------------------------------------------------------------------- gradient signals


@dataclass
class GradientMoments:
    """Running sums over groups of one layer's gradient, enough for its mean, variance and sign agreement
    without keeping every group's gradient (float32 sums and int16 sign counts: an 8B model's layers fit)."""

    total: torch.Tensor  # sum over groups of the flattened gradient
    sign_total: torch.Tensor  # sum over groups of its sign
    squared_norms: float = 0.0  # sum over groups of ||g||^2, in float64
    groups: int = 0

    @classmethod
    def zeros(cls, size: int, device=None) -> GradientMoments:
        return cls(torch.zeros(size, dtype=torch.float32, device=device),
                   torch.zeros(size, dtype=torch.int16, device=device))

    def add(self, gradient: torch.Tensor) -> None:
        g = gradient.detach().reshape(-1).float()
        self.total += g
        self.sign_total += torch.sign(g).to(torch.int16)
        self.squared_norms += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
        self.groups += 1


def gradient_signals(moments: GradientMoments, weight_norm: float) -> dict[str, float]:
    """``grad_norm`` (||mean|| / ||W||), ``grad_snr`` (||mean||^2 / (tr(Cov) / K)) and
    ``grad_sign_agreement`` (mean |mean sign|) of a layer's group gradients; NaN with fewer than 2 groups."""
    k = moments.groups
    if k < 2:
        return {"grad_norm": float("nan"), "grad_snr": float("nan"), "grad_sign_agreement": float("nan")}
    mean = moments.total.double() / k
    mean_sq = float(mean @ mean)
    # unbiased trace of the covariance: (sum ||g||^2 - K ||mean||^2) / (K - 1)
    trace = max((moments.squared_norms - k * mean_sq) / (k - 1), 0.0)
    snr = mean_sq / (trace / k) if trace > 0 else float("inf")
    return {"grad_norm": math.sqrt(mean_sq) / weight_norm if weight_norm > 0 else float("nan"),
            "grad_snr": snr, "grad_sign_agreement": float((moments.sign_total.double() / k).abs().mean())}


# -------------------------------------------------------------------------------------------- weight spectra


def spectrum_snr(weight: torch.Tensor) -> float:
    """Signal-to-noise of one matrix's singular values: sum above the Marchenko-Pastur edge
    sigma (1 + sqrt(beta)) over the sum below it, beta = min/max of the shape, sigma = IQR / 1.349 of the
    singular values (robust to the few large ones). Inf when nothing is below the edge."""
    values = torch.linalg.svdvals(weight.detach().double())
    rows, cols = weight.shape
    beta = min(rows, cols) / max(rows, cols)
    q25, q75 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))
    sigma = float(q75 - q25) / 1.349
    edge = sigma * (1 + math.sqrt(beta))
    signal, noise = float(values[values > edge].sum()), float(values[values <= edge].sum())
    return signal / noise if noise > 0 else float("inf")


def spectrum_scores(per_matrix: Mapping[tuple[int, str], float]) -> dict[int, float]:
    """A layer score from per-(layer, matrix kind) SNRs: log SNR z-scored across layers within each kind
    (kinds differ in scale), averaged over the layer's kinds. An infinite log (nothing below, or nothing
    above, the edge) counts as the kind's largest, or smallest, finite one."""
    kinds: dict[str, dict[int, float]] = {}
    for (layer, kind), value in per_matrix.items():
        kinds.setdefault(kind, {})[layer] = math.log(value) if value > 0 else -math.inf
    scores: dict[int, list[float]] = {}
    for values in kinds.values():
        finite = [v for v in values.values() if math.isfinite(v)]
        if not finite:
            continue
        low, high = min(finite), max(finite)
        logs = {layer: min(max(v, low), high) for layer, v in values.items()}
        mean, std = float(np.mean(list(logs.values()))), float(np.std(list(logs.values())))
        for layer, v in logs.items():
            scores.setdefault(layer, []).append(0.0 if std == 0 else (v - mean) / std)
    return {layer: float(np.mean(z)) for layer, z in sorted(scores.items())}


def position_baseline(num_layers: int) -> dict[int, float]:
    """-|relative depth - 0.5| with relative depth (l + 0.5) / L: highest for the middle layers."""
    return {layer: -abs((layer + 0.5) / num_layers - 0.5) for layer in range(num_layers)}


# --------------------------------------------------------------------------------------- scoring a predictor


def top_overlap(predicted: Mapping[int, float], measured: Mapping[int, float], k: int) -> tuple[int, float]:
    """How many of the ``k`` highest predicted layers are among the ``k`` highest measured ones, and what a
    random choice of ``k`` gets on average (k^2 / n). Ties go to the shallower layer on both sides."""
    layers = sorted(set(predicted) & set(measured))

    def best(values: Mapping[int, float]) -> set[int]:
        return set(sorted(layers, key=lambda layer: (-values[layer], layer))[:k])

    return len(best(predicted) & best(measured)), k * k / len(layers)


def regret(predicted: Mapping[int, float], measured: Mapping[int, float]) -> float:
    """C of the predicted best layer over C of the measured best (1 = the predictor found the best layer)."""
    layers = sorted(set(predicted) & set(measured))
    pick = min(layers, key=lambda i: (-predicted[i], i))
    top = max(measured[i] for i in layers)
    return measured[pick] / top if top > 0 else float("nan")


def _ranks(values: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman correlation of x and y controlling for z: the correlation of the residuals of x's and y's
    ranks after a least-squares fit on z's ranks (NaN when z explains x or y entirely)."""
    rx, ry, rz = _ranks(x), _ranks(y), _ranks(z)
    design = np.column_stack([np.ones_like(rz), rz])

    def residual(r):
        coef, *_ = np.linalg.lstsq(design, r, rcond=None)
        return r - design @ coef

    ex, ey = residual(rx), residual(ry)
    # nothing left of x or y once z is fitted (rounding aside): the partial correlation is undefined
    if min(np.linalg.norm(ex) / np.linalg.norm(rx - rx.mean()), np.linalg.norm(ey) / np.linalg.norm(ry - ry.mean())) < 1e-9:
        return float("nan")
    return float(ex @ ey / (np.linalg.norm(ex) * np.linalg.norm(ey)))


def permutation_p(x: Sequence[float], y: Sequence[float], resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho (exact over all orders up to 8 layers, as
    :func:`onelayer.analysis.rank.rank_correlation` computes it; sampled orders beyond)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    exact = rank_correlation(x, y)
    if x.size <= 8 or not math.isfinite(exact.spearman):
        return exact.spearman_p
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    observed = abs(float(rx @ ry))
    rng = np.random.default_rng(seed)
    hits = sum(abs(float(rx @ ry[rng.permutation(y.size)])) >= observed - 1e-9 for _ in range(resamples))
    return (hits + 1) / (resamples + 1)


def rho_difference(a: Mapping[int, float], b: Mapping[int, float], measured: Mapping[int, float],
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman rho of predictor ``a`` with ``measured`` minus that of predictor ``b``, with a 95% interval from
    resampling the layers (the same resampled layers for both: a paired bootstrap). Resamples whose values are
    constant on one side are dropped."""
    layers = sorted(layer for layer in set(a) & set(b) & set(measured)
                    if math.isfinite(a[layer]) and math.isfinite(b[layer]) and math.isfinite(measured[layer]))
    xa, xb, y = (np.array([d[layer] for layer in layers]) for d in (a, b, measured))

    def rho(x, z) -> float:
        rx, rz = _ranks(x), _ranks(z)
        rx, rz = rx - rx.mean(), rz - rz.mean()
        denominator = np.linalg.norm(rx) * np.linalg.norm(rz)
        return float(rx @ rz / denominator) if denominator > 0 else float("nan")

    value = rho(xa, y) - rho(xb, y)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        pick = rng.integers(0, len(layers), len(layers))
        d = rho(xa[pick], y[pick]) - rho(xb[pick], y[pick])
        if math.isfinite(d):
            samples.append(d)
    if not samples:
        return value, float("nan"), float("nan")
    return value, float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


@dataclass(frozen=True)
class PredictorScore:
    signal: str
    n: int  # layers compared
    spearman: float
    p_value: float
    partial_spearman: float  # controlling for |depth - 0.5|
    top1: int
    top3: int
    top3_chance: float
    top20: int  # of the top 20% (at least 1)
    top20_k: int
    top20_chance: float
    regret: float  # C(predicted best) / C(best)
    share_of_ceiling: float  # rho / the scan's own seed-to-seed rho (nan without it)
    seconds: float
    over_position: tuple[float, float, float] = (float("nan"),) * 3  # rho - rho(position) [95% interval]


def score_predictor(signal: str, predicted: Mapping[int, float], measured: Mapping[int, float], num_layers: int,
                    seconds: float = float("nan"), ceiling: float = float("nan")) -> PredictorScore:
    """Every comparison of one signal with a scan's measured contributions, over the layers both have,
    including how much its rho exceeds the position baseline's."""
    layers = sorted(layer for layer in set(predicted) & set(measured)
                    if math.isfinite(predicted[layer]) and math.isfinite(measured[layer]))
    x, y = [predicted[i] for i in layers], [measured[i] for i in layers]
    corr = rank_correlation(x, y)
    depth = [abs((i + 0.5) / num_layers - 0.5) for i in layers]
    pred, meas = {i: predicted[i] for i in layers}, {i: measured[i] for i in layers}
    k3, k20 = min(3, len(layers)), max(1, round(0.2 * len(layers)))
    top3, chance3 = top_overlap(pred, meas, k3)
    top20, chance20 = top_overlap(pred, meas, k20)
    return PredictorScore(
        signal=signal, n=len(layers), spearman=corr.spearman, p_value=permutation_p(x, y),
        partial_spearman=partial_spearman(x, y, depth) if len(layers) > 3 else float("nan"),
        top1=top_overlap(pred, meas, 1)[0], top3=top3, top3_chance=chance3, top20=top20, top20_k=k20,
        top20_chance=chance20, regret=regret(pred, meas),
        share_of_ceiling=corr.spearman / ceiling if math.isfinite(ceiling) and ceiling > 0 else float("nan"),
        seconds=seconds, over_position=rho_difference(pred, position_baseline(num_layers), meas))
