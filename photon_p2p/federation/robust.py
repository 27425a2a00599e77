"""Robust reduction of one all-reduce part: bound each sender's influence (clipping, CenteredClip), drop non-finite.

A reducer of the butterfly all-reduce holds every sender's chunk of its part. Here it combines them so that no one
sender can move the part's average far, whatever it sends (Karimireddy et al. 2021 "Learning from History for
Byzantine Robust Optimization"; Gorbunov et al. 2021 "Secure Distributed Training at Scale", BTARD):

- ``clip``: each chunk's L2 norm is clipped to ``multiplier`` × the (lower) median of the chunk norms, and each
  sender's weight to WEIGHT_CAP × the median weight (weights are self-declared token counts). One pass.
- ``centered_clip``: start from the coordinate-wise (lower) median, then ``iterations`` times move towards the
  weighted mean of the deviations, each deviation clipped to ``multiplier`` × the median deviation norm.
- ``none``: the plain weighted mean (a non-finite chunk then makes the whole part non-finite, as before).

In ``clip`` and ``centered_clip`` a chunk with a non-finite value is dropped (weight 0). The result is a pure
function of the chunks, their weights and the canonical sender order, so the reducer computes it once and every
member receives the same bytes (hivemind_ext/allreduce.py, ExactAllReduceRunner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("none", "clip", "centered_clip")
# A sender's declared weight (tokens) counts up to this many times the median weight: silos of different speeds
# legitimately differ (round_clock: swarm), by less than this in our runs; a claim of 1e9 tokens does not.
WEIGHT_CAP = 4.0
PAIR_MULTIPLIER = 2.0  # the least clip/centered_clip multiplier a part of only two senders is reduced with
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
                settings: RobustSettings, caps: list[float | None] | None = None,
                spent: dict[int, float] | None = None) -> tuple[torch.Tensor, dict[int, float]]:
    """The (robust) weighted average of ``parts`` summed in ``order``, and {sender index: factor < 1}.

    A factor is how much of the sender's contribution the reduction kept (0: dropped as non-finite; in ``clip``
    the chunk's scale times its weight's; in ``centered_clip`` the scale of its deviation from the center).
    Senders with weight 0 or no part only receive the average. ``parts`` are never modified.
    ``caps``: per sender, the largest norm its chunk may count with (ClaimBudget); the clipping threshold is
    still taken from the chunks as sent, so a sender capped to nothing does not drag the others' limit down.
    ``spent``: filled with each sender's squared norm as it counted (to charge its budget).
    """
    spent = {} if spent is None else spent
    # A weight is a token count: an honest sender declares one >= 1 (0: it only receives). A negative, NaN or
    # infinite weight is dropped like a non-finite chunk, in every mode: with weight -4 against three honest
    # senders of 1, zeros came out as -3x the honest mean, and a NaN weight made every member's part NaN.
    bad = {i: 0.0 for i in order if parts[i] is not None and not (math.isfinite(weights[i]) and weights[i] >= 0)}
    senders = [i for i in order if parts[i] is not None and weights[i] != 0.0 and i not in bad]
    if not senders:
        if bad:
            return torch.zeros_like(parts[next(iter(bad))]), bad  # nothing usable: no update for this part
        raise ValueError("no sender contributed to this part")
    like = parts[senders[0]]
    if settings.mode == "none":
        acc, den = torch.zeros_like(like), 0.0
        for i in senders:
            acc.add_(parts[i], alpha=weights[i])
            den += weights[i]
        return acc.div_(den), bad
    factors: dict[int, float] = dict(bad)
    finite, norms = [], {}
    for i in senders:
        # One pass: nan/inf propagate into the norm; an overflow (values past ~1e19) is confirmed exactly.
        norm = float(torch.linalg.vector_norm(parts[i]))
        if math.isfinite(norm) or bool(torch.isfinite(parts[i]).all()):
            finite.append(i)
            norms[i] = norm if math.isfinite(norm) else float(torch.linalg.vector_norm(parts[i].double()))
        else:
            factors[i] = 0.0
    if not finite:  # nothing usable: no update for this part (zeros, like a failed reducer's part)
        return torch.zeros_like(like), factors
    tau = float(settings.multiplier)
    if len(finite) == 2:
        # Two senders: the (lower) median is the smaller norm, so a multiplier of 1 would scale the larger update
        # down every round, and two cannot outvote each other anyway (the breakdown point, ARCHITECTURE "Trust").
        tau = max(tau, PAIR_MULTIPLIER)
    w = {i: float(weights[i]) for i in finite}
    if settings.mode == "clip":
        # Weights: a sender declaring 1e9 tokens would otherwise own the average even after its chunk is clipped.
        wcap = WEIGHT_CAP * _lower_median(torch.tensor([w[i] for i in finite], dtype=torch.float64))
        limit = tau * _lower_median(torch.tensor([norms[i] for i in finite], dtype=torch.float64))
        acc, den = torch.zeros_like(like), 0.0
        for i in finite:
            cap = caps[i] if caps is not None and caps[i] is not None else float("inf")
            wf, cf = _factor(w[i], wcap), _factor(norms[i], min(limit, cap))
            spent[i] = (cf * norms[i]) ** 2
            weight = w[i] * wf
            acc.add_(parts[i], alpha=weight * cf)
            den += weight
            if wf * cf < 1.0:
                factors[i] = wf * cf
        return acc.div_(den), factors
    if settings.mode == "centered_clip":
        parts = list(parts)
        for i in finite:  # chunks beyond their sender's cap count as capped, center included
            norm = norms[i]
            f = _factor(norm, caps[i]) if caps is not None and caps[i] is not None else 1.0
            if f < 1.0:
                parts[i], factors[i] = parts[i] * f, f
            spent[i] = (f * norm) ** 2
        stacked = torch.stack([parts[i] for i in finite])
        center = stacked.median(dim=0).values  # coordinate-wise lower median: a robust start
        den = sum(w[i] for i in finite)
        dev0 = [float(torch.linalg.vector_norm(parts[i] - center)) for i in finite]
        limit = tau * _lower_median(torch.tensor(dev0, dtype=torch.float64))
        last: dict[int, float] = {}
        for _ in range(max(1, int(settings.iterations))):
            step = torch.zeros_like(like)
            for i in finite:
                dev = parts[i] - center
                cf = _factor(float(torch.linalg.vector_norm(dev)), limit)
                step.add_(dev, alpha=w[i] * cf / den)
                last[i] = cf
            center = center + step
        for i, f in last.items():
            if f < 1.0:
                factors[i] = min(f, factors.get(i, 1.0))
        return center, factors
    raise ValueError(f"unknown robust aggregation mode {settings.mode!r} (expected one of {', '.join(MODES)})")


def merge_factors(into: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Per peer, the smallest factor seen (across parts, stages): the worst a reducer had to do to it."""
    for peer, f in new.items():
        into[peer] = min(float(f), into.get(peer, 1.0))
    return into


# ---- what one member can check of the reducers (a malicious reducer) ----------------------------------------
# Every member declares the L2 norm of the Δ it sends (gathered metadata, "norm"). An honest reducer caps each
# sender's chunks so that, summed over the reducer's parts, their squared norms stay within the sender's claim
# (times CLAIM_SLACK for codec error). Every mode's average of a part is a convex combination of (capped) chunks
# (and, in centered_clip, of the coordinate median, itself within sqrt(sum of squares)), so the squared norm of
# all the parts one reducer returns is at most CLAIM_SLACK² Σ_i claim_i²; members allow CHECK_SLACK more for the
# codec applied to the average. A reducer that returns more is provably not following the protocol.
CLAIM_SLACK = 1.05
CHECK_SLACK = 1.1
CLAIM_CAP = 4.0  # a declared norm counts up to this many times the (lower) median declared norm


def cap_claims(claims: list[float]) -> list[float]:
    """Declared norms, each capped at CLAIM_CAP × their lower median: a member declaring a huge norm would
    otherwise loosen every reducer's bound (and its own chunks' cap). Same inputs on every member, same caps."""
    if not claims:
        return []
    limit = CLAIM_CAP * _lower_median(torch.tensor(claims, dtype=torch.float64))
    return [min(float(c), limit) for c in claims]


class ClaimBudget:
    """A reducer's per-sender budget of squared norm across its parts (the sender's claimed Δ norm, squared)."""

    def __init__(self, claims: list[float | None]) -> None:
        self.left = [None if c is None else (CLAIM_SLACK * float(c)) ** 2 for c in claims]

    def caps(self) -> list[float | None]:
        """Per sender, the largest norm its next chunk may count with (None: no claim, no cap)."""
        return [None if left is None else max(0.0, left) ** 0.5 for left in self.left]

    def spend(self, spent: dict[int, float]) -> None:
        for index, sq in spent.items():
            if self.left[index] is not None:
                self.left[index] -= sq


class ReducerCheck:
    """A member's check of the averages it receives, per reducer: all members see the same bytes and the same
    claims, so honest members reach the same verdict, and reject (zero) the same parts."""

    def __init__(self, claims: list[float]) -> None:
        self.bound = (CHECK_SLACK * CLAIM_SLACK) ** 2 * sum(float(c) ** 2 for c in claims)
        self.used: dict[int, float] = {}
        self.rejected: set[int] = set()

    def accept(self, reducer: int, part: torch.Tensor) -> bool:
        """Whether to keep this part (parts of one reducer come in order); once a reducer exceeds the bound, its
        remaining parts are rejected too."""
        if reducer in self.rejected:
            return False
        sq = float(torch.linalg.vector_norm(part)) ** 2
        self.used[reducer] = self.used.get(reducer, 0.0) + sq
        if not (self.used[reducer] <= self.bound):  # also catches nan/inf
            self.rejected.add(reducer)
            return False
        return True
