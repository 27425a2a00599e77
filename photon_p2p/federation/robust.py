"""Robust reduction of one all-reduce part: bound each sender's influence (clipping, CenteredClip), drop non-finite.

A reducer of the butterfly all-reduce holds every sender's chunk of its part. Here it combines them so that no one
sender can move the part's average far, whatever it sends (Karimireddy et al. 2021 "Learning from History for
Byzantine Robust Optimization"; Gorbunov et al. 2021 "Secure Distributed Training at Scale", BTARD):

- ``clip``: each chunk's L2 norm is clipped to ``multiplier`` × the (lower) median of the chunk norms, and each
  sender's weight to WEIGHT_CAP × the median weight (weights are self-declared token counts). One pass.
- ``centered_clip``: start from the coordinate-wise (lower) median, then ``iterations`` times move towards the
  weighted mean of the deviations, each deviation clipped to ``multiplier`` × the median deviation norm.
- ``off``: the plain weighted mean (a non-finite chunk then makes the whole part non-finite, as before).

In ``clip`` and ``centered_clip`` a chunk with a non-finite value is dropped (weight 0). The result is a pure
function of the chunks, their weights and the canonical sender order, so the reducer computes it once and every
member receives the same bytes (averager_process.ExactAllReduceRunner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("off", "clip", "centered_clip")
# A sender's declared weight (tokens) counts up to this many times the median weight: silos of different speeds
# legitimately differ (round_clock: swarm), by less than this in our runs; a claim of 1e9 tokens does not.
WEIGHT_CAP = 4.0
FACTOR_STEP = 2.0 ** -20  # factors are rounded down to this grid: a last-bit difference in a norm rarely matters


@dataclass(frozen=True)
class RobustSettings:
    """federation.robust_aggregation / clip_multiplier / clip_iterations, as the reducer uses them."""

    mode: str = "clip"
    multiplier: float = 2.0
    iterations: int = 3


def _lower_median(values: torch.Tensor) -> float:
    """The lower median (an element of ``values``): with n values, fewer than ceil(n/2) large ones cannot move it
    above an honest value; torch.median returns the lower one for an even count."""
    return float(values.median())


def _factor(norm: float, limit: float) -> float:
    if norm <= limit or norm == 0.0:
        return 1.0
    f = limit / norm
    return max(FACTOR_STEP, (f // FACTOR_STEP) * FACTOR_STEP) if f > FACTOR_STEP else f


def reduce_part(parts: list[torch.Tensor | None], weights: list[float], order: list[int],
                settings: RobustSettings) -> tuple[torch.Tensor, dict[int, float]]:
    """The (robust) weighted average of ``parts`` summed in ``order``, and {sender index: factor < 1}.

    A factor is how much of the sender's contribution the reduction kept (0: dropped as non-finite; in ``clip``
    the chunk's scale times its weight's; in ``centered_clip`` the scale of its deviation from the center).
    Senders with weight 0 or no part only receive the average. ``parts`` are never modified.
    """
    senders = [i for i in order if parts[i] is not None and weights[i] != 0.0]
    if not senders:
        raise ValueError("no sender contributed to this part")
    like = parts[senders[0]]
    if settings.mode == "off":
        acc, den = torch.zeros_like(like), 0.0
        for i in senders:
            acc.add_(parts[i], alpha=weights[i])
            den += weights[i]
        return acc.div_(den), {}
    factors: dict[int, float] = {}
    finite = []
    for i in senders:
        if bool(torch.isfinite(parts[i]).all()):
            finite.append(i)
        else:
            factors[i] = 0.0
    if not finite:  # nothing usable: no update for this part (zeros, like a failed reducer's part)
        return torch.zeros_like(like), factors
    tau = float(settings.multiplier)
    w = {i: float(weights[i]) for i in finite}
    if settings.mode == "clip":
        # Weights: a sender declaring 1e9 tokens would otherwise own the average even after its chunk is clipped.
        wcap = WEIGHT_CAP * _lower_median(torch.tensor([w[i] for i in finite], dtype=torch.float64))
        norms = {i: float(torch.linalg.vector_norm(parts[i].double())) for i in finite}
        limit = tau * _lower_median(torch.tensor([norms[i] for i in finite], dtype=torch.float64))
        acc, den = torch.zeros_like(like), 0.0
        for i in finite:
            wf, cf = _factor(w[i], wcap), _factor(norms[i], limit)
            weight = w[i] * wf
            acc.add_(parts[i], alpha=weight * cf)
            den += weight
            if wf * cf < 1.0:
                factors[i] = wf * cf
        return acc.div_(den), factors
    if settings.mode == "centered_clip":
        stacked = torch.stack([parts[i] for i in finite])
        center = stacked.median(dim=0).values  # coordinate-wise lower median: a robust start
        den = sum(w[i] for i in finite)
        dev0 = [float(torch.linalg.vector_norm((parts[i] - center).double())) for i in finite]
        limit = tau * _lower_median(torch.tensor(dev0, dtype=torch.float64))
        last: dict[int, float] = {}
        for _ in range(max(1, int(settings.iterations))):
            step = torch.zeros_like(like)
            for i in finite:
                dev = parts[i] - center
                cf = _factor(float(torch.linalg.vector_norm(dev.double())), limit)
                step.add_(dev, alpha=w[i] * cf / den)
                last[i] = cf
            center = center + step
        factors.update({i: f for i, f in last.items() if f < 1.0})
        return center, factors
    raise ValueError(f"unknown robust aggregation mode {settings.mode!r} (expected one of {', '.join(MODES)})")


def merge_factors(into: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Per peer, the smallest factor seen (across parts, stages): the worst a reducer had to do to it."""
    for peer, f in new.items():
        into[peer] = min(float(f), into.get(peer, 1.0))
    return into
