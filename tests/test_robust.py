"""Robust reduction of one all-reduce part (federation/robust.py) and how it is reported: fast, in-process."""

import asyncio
import math

import pytest
import torch

from photon_p2p.federation.hivemind_ext.partition import OrderedPartReducer
from photon_p2p.federation.robust import FACTOR_STEP, RobustSettings, merge_factors, reduce_part
from photon_p2p.peer_report import clip_summary, clip_text

CLIP, CENTERED, OFF = RobustSettings("clip", 2.0), RobustSettings("centered_clip", 2.0, 3), RobustSettings("none")


def honest(n: int = 4, size: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g)
    return [base + 0.3 * torch.randn(size, generator=g) for _ in range(n)]


def plain_mean(parts, weights):
    return sum(p * w for p, w in zip(parts, weights)) / sum(weights)


@pytest.mark.parametrize("settings", [CLIP, CENTERED])
def test_honest_inputs_are_left_alone_or_nearly(settings):
    parts, weights = honest(), [1.0, 2.0, 1.5, 1.0]
    avg, factors = reduce_part(parts, weights, [0, 1, 2, 3], settings)
    assert factors == {}
    assert torch.allclose(avg, plain_mean(parts, weights), atol=1e-5)


def test_clip_without_clipping_is_bit_identical_to_the_plain_mean():
    parts, weights = honest(), [3.0, 1.0, 2.0, 5.0]
    off, _ = reduce_part(parts, weights, [2, 0, 3, 1], OFF)
    clip, factors = reduce_part(parts, weights, [2, 0, 3, 1], CLIP)
    assert factors == {} and torch.equal(off, clip)


@pytest.mark.parametrize("settings", [CLIP, CENTERED])
def test_a_scaled_sender_is_clipped_and_its_factor_reported(settings):
    parts = honest()
    parts[2] = parts[2] * 1e4
    avg, factors = reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], settings)
    assert set(factors) == {2} and 0 < factors[2] < 1e-3
    honest_mean = plain_mean([parts[0], parts[1], parts[3]], [1.0] * 3)
    # bounded: the attacker moves the average by at most multiplier x a median-sized chunk / n
    assert float((avg - honest_mean).norm()) < 2.0 * float(honest_mean.norm())
    assert float(avg.norm()) < 3 * float(honest_mean.norm())


def test_clip_factor_is_the_ratio_to_the_median_norm():
    parts = [torch.ones(4), torch.ones(4) * 1.1, torch.ones(4) * 0.9, torch.ones(4) * 10.0]
    _, factors = reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], RobustSettings("clip", 2.0))
    # lower median of the norms (1.8, 2.0, 2.2, 20) is 2.0: the limit is 4.0, the big chunk keeps 4/20
    assert math.isclose(factors[3], 0.2, abs_tol=2 * FACTOR_STEP)


def test_a_huge_declared_weight_is_capped():
    parts = honest()
    avg, factors = reduce_part(parts, [1.0, 1.0, 1.0, 1e9], [0, 1, 2, 3], CLIP)
    assert set(factors) == {3} and factors[3] < 1e-8
    assert torch.allclose(avg, plain_mean(parts, [1.0, 1.0, 1.0, 4.0]), atol=1e-5)  # WEIGHT_CAP x the median


@pytest.mark.parametrize("settings", [CLIP, CENTERED])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_chunk_is_dropped_not_the_round(settings, bad):
    parts = honest()
    parts[1] = parts[1].clone()
    parts[1][7] = bad
    avg, factors = reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], settings)
    assert factors == {1: 0.0}
    assert bool(torch.isfinite(avg).all())
    assert torch.allclose(avg, plain_mean([parts[0], parts[2], parts[3]], [1.0] * 3), atol=1e-5)


def test_off_keeps_the_old_behaviour_non_finite_spreads():
    parts = honest()
    parts[0] = parts[0] * float("nan")
    avg, factors = reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], OFF)
    assert factors == {} and not bool(torch.isfinite(avg).all())


def test_zero_weight_senders_only_listen():
    parts = honest()
    parts[3] = parts[3] * 1e6
    avg, factors = reduce_part(parts, [1.0, 1.0, 1.0, 0.0], [0, 1, 2, 3], CLIP)
    assert factors == {}
    assert torch.allclose(avg, plain_mean(parts[:3], [1.0] * 3), atol=1e-5)


@pytest.mark.parametrize("settings", [CLIP, CENTERED, OFF])
@pytest.mark.parametrize("bad", [-4.0, float("nan"), float("inf"), float("-inf")])
def test_a_negative_or_non_finite_weight_is_dropped_in_every_mode(settings, bad):
    # issue 24, item 4: zeros sent with weight -4 against three honest senders made the mean -3x the honest one;
    # a NaN weight made every member's part NaN. Such a sender is dropped (factor 0), whatever the mode.
    parts = honest()
    parts[3] = torch.zeros_like(parts[3])
    avg, factors = reduce_part(parts, [1.0, 1.0, 1.0, bad], [0, 1, 2, 3], settings)
    assert factors.get(3) == 0.0 and bool(torch.isfinite(avg).all())
    if settings is OFF:
        assert torch.equal(avg, reduce_part(parts[:3], [1.0] * 3, [0, 1, 2], OFF)[0])
    else:
        assert torch.allclose(avg, plain_mean(parts[:3], [1.0] * 3), atol=1e-5)
    # every sender bad: no update for this part (zeros), each of them reported dropped
    avg, factors = reduce_part(parts, [bad] * 4, [0, 1, 2, 3], settings)
    assert factors == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0} and not bool(avg.any())


@pytest.mark.parametrize("settings", [CLIP, CENTERED])
def test_the_result_is_a_pure_function_of_inputs_and_order(settings):
    """Same chunks, same order: the same bytes (what lets one encoding go to every member and two groups agree)."""
    parts = honest(5)
    parts[4] = parts[4] * -300
    a, fa = reduce_part([p.clone() for p in parts], [1.0, 2.0, 3.0, 1.0, 1.0], [4, 3, 2, 1, 0], settings)
    b, fb = reduce_part([p.clone() for p in parts], [1.0, 2.0, 3.0, 1.0, 1.0], [4, 3, 2, 1, 0], settings)
    assert torch.equal(a, b) and fa == fb


def test_two_of_four_colluding_senders_stay_bounded_by_the_lower_median():
    parts = honest()
    parts[0], parts[1] = parts[0] * 1e4, parts[1] * 1e4
    avg, factors = reduce_part(parts, [1.0] * 4, [0, 1, 2, 3], CLIP)
    assert set(factors) == {0, 1}
    assert float(avg.norm()) <= 2.0 * max(float(parts[2].norm()), float(parts[3].norm())) + 1e-3


def test_the_part_reducer_reports_factors_by_sender_and_sends_one_average():
    parts = honest(3, size=8)
    parts[1] = parts[1] * 1e4

    async def all_senders():
        reducer = OrderedPartReducer((torch.Size([8]),), 3, [2, 0, 1], RobustSettings("clip", 2.0))
        got = await asyncio.gather(*(reducer.accumulate_part(i, 0, parts[i], weight=1.0) for i in range(3)))
        return reducer, got

    reducer, results = asyncio.run(all_senders())
    assert all(r is results[0] for r in results)  # one tensor, encoded once for every member
    assert set(reducer.factors) == {1} and reducer.factors[1] < 1e-3


def test_report_helpers():
    assert merge_factors({"a": 0.5}, {"a": 0.1, "b": 0.0}) == {"a": 0.1, "b": 0.0}
    summary = clip_summary([{"a": 0.5}, {}, {"a": 0.1, "b": 0.0}])
    assert summary == {"a": {"rounds": 2, "factor": 0.1}, "b": {"rounds": 1, "factor": 0.0}}
    assert clip_text({"QmAAAAAAAAAAAAAAAAAAAAxyz": 0.0001, "b": 0.0}) == \
        "dropped b, clipped ..AAAAAAAAAxyz x0.0001"


def test_claim_budget_caps_a_sender_to_its_declared_norm_across_parts():
    from photon_p2p.federation.robust import CLAIM_SLACK, ClaimBudget

    budget = ClaimBudget([5.0, None, 1.0])
    parts = [torch.full((4,), 2.0), torch.full((4,), 30.0), torch.full((4,), 1.0)]
    spent: dict[int, float] = {}
    avg, factors = reduce_part(parts, [1.0] * 3, [0, 1, 2], RobustSettings("clip", 1000.0), budget.caps(), spent)
    budget.spend(spent)
    # sender 0 (norm 4) fits its claim 5.25; sender 2 (norm 2) counts with 1.05 at most; sender 1 has no claim
    assert set(factors) == {2} and math.isclose(factors[2], CLAIM_SLACK / 2, rel_tol=1e-5)
    assert math.isclose(budget.caps()[0], math.sqrt((CLAIM_SLACK * 5) ** 2 - 16), rel_tol=1e-6)
    assert budget.caps()[1] is None and budget.caps()[2] < 1e-2  # spent, up to the factor grid
    _, factors = reduce_part(parts, [1.0] * 3, [0, 1, 2], RobustSettings("clip", 1000.0), budget.caps())
    assert 0.8 < factors[0] < 0.9 and factors[2] < 1e-2  # the rest of its budget; 2 has (almost) none left


def test_a_sender_capped_to_nothing_does_not_drag_the_clipping_limit_down():
    # a group of two: the scaled sender's budget is spent, but the limit still comes from the chunks as sent
    parts = [torch.ones(4), torch.ones(4) * 1e4]
    _, factors = reduce_part(parts, [1.0, 1.0], [0, 1], CLIP, caps=[None, 0.0])
    assert factors == {1: 0.0}


def test_reducer_check_rejects_a_reducer_beyond_the_claims_and_everything_after():
    from photon_p2p.federation.robust import ReducerCheck

    check = ReducerCheck([3.0, 4.0])  # bound: (1.1 x 1.05)² x 25
    assert check.accept(0, torch.full((4,), 2.0))  # 16
    assert check.accept(1, torch.full((4,), 2.5))
    assert check.accept(0, torch.full((4,), 2.0))  # 32 <= 33.35
    assert not check.accept(0, torch.full((4,), 1.0))  # 36 > 33.35: rejected
    assert not check.accept(0, torch.zeros(4))  # and every later part of that reducer
    assert check.accept(1, torch.zeros(4)) and not check.accept(1, torch.tensor([float("nan")]))
    assert check.rejected == {0, 1}


def test_a_huge_declared_norm_is_capped_so_it_cannot_loosen_the_check():
    from photon_p2p.federation.robust import CLAIM_CAP, cap_claims

    assert cap_claims([1.0, 1.2, 0.9, 1e9]) == [1.0, 1.2, 0.9, CLAIM_CAP * 1.0]
    assert cap_claims([1.0, 1.1]) == [1.0, 1.1] and cap_claims([]) == []


def test_local_robust_mean_reduces_each_share_like_the_bulk_path():
    """bulk.local_robust_mean (bench/fed_sim.py's reduction) cuts the vector into one share per member and parts
    within it, as bulk.robust_mean does: a sender that is large only in the first share is clipped there and
    nowhere else, and mode none is the weighted mean."""
    from photon_p2p.federation.bulk import local_robust_mean

    def group_mean(vecs, weights, settings, part_numel):
        return local_robust_mean(vecs, weights, lambda p, w, o: reduce_part(p, w, o, settings), part_numel)

    torch.manual_seed(0)
    base = torch.randn(12)
    vecs = [base + 0.1 * torch.randn(12) for _ in range(3)]  # honest: chunk norms within a few % of each other
    weights = [1.0, 2.0, 1.0]
    plain, factors = group_mean(vecs, weights, RobustSettings(mode="none"), part_numel=2)
    assert factors == {} and torch.allclose(plain, sum(v * w for v, w in zip(vecs, weights)) / 4.0)
    big = [v.clone() for v in vecs]
    big[2][:4] *= 100.0  # shares of 4 values (12 / 3 members): only share 0 is large
    out, factors = group_mean(big, weights, RobustSettings(mode="clip", multiplier=2.0), part_numel=2)
    assert set(factors) == {2} and factors[2] < 0.1
    honest, honest_factors = group_mean(vecs, weights, RobustSettings(mode="clip"), part_numel=2)
    assert honest_factors == {}
    assert torch.equal(out[4:], honest[4:])
    assert float(out[:4].abs().max()) < 10.0  # bounded where the big sender was clipped


def test_a_multiplier_of_one_caps_a_sender_at_the_median_norm_but_a_pair_keeps_twice_it():
    # issue 24 (fake-fingerprint: one of four pushing the same way every round cost +81% val ppl with 2, +20% with 1)
    one = RobustSettings("clip", 1.0)
    four = [torch.full((4,), v) for v in (1.0, 1.0, 1.0, 10.0)]
    _, factors = reduce_part(four, [1.0] * 4, [0, 1, 2, 3], one)
    assert factors == {3: pytest.approx(0.1, rel=1e-4)}  # clipped to the median norm, not to twice it
    pair = [torch.full((4,), 1.0), torch.full((4,), 1.5)]  # an honest pair: 1.5x is no reason to scale it down
    avg, factors = reduce_part(pair, [1.0, 1.0], [0, 1], one)
    assert factors == {} and torch.allclose(avg, torch.full((4,), 1.25))
