"""The round protocol's pure rules (federation/protocol.py): roster, wait budget, leader, no-shows, majority, end."""

from __future__ import annotations

import pytest

from photon_p2p.federation.protocol import (
    ClockRecord,
    NoShows,
    Outcome,
    arrival_s,
    catch_up_round,
    fold,
    leader_left,
    one_model_group,
    heals,
    majority,
    member_round_s,
    moved_on,
    orphaned,
    others_done,
    outcome,
    roster,
    server_moved,
    state_verdict,
    speed_quota,
    round_leader,
    run_over,
    split_winner,
    wait_budget,
)


def test_the_budget_follows_the_work_within_its_bounds():
    assert wait_budget(20.0, 3.0, 0.0, 0.5, limit=60.0) == 10.0  # half a 20 s round
    assert wait_budget(2.0, 3.0, 0.0, 0.5, limit=60.0) == 3.0  # never below the matchmaking window
    assert wait_budget(2.0, 3.0, 5.0, 0.5, limit=60.0) == 5.0  # nor below straggler_wait
    assert wait_budget(600.0, 3.0, 0.0, 0.5, limit=15.0) == 15.0  # nor above round_deadline / 2


def test_arrival_is_projected_from_steps_and_speed():
    r = ClockRecord(round=4, steps=10, speed=2.0, time=100.0)  # 5 s of a 12 s round done at t=100
    assert arrival_s(r, round_s=12.0, now=101.0) == 6.0
    assert arrival_s(r, round_s=12.0, now=120.0) == 0.0  # should be done: waited for, not projected negative
    assert arrival_s(ClockRecord(4), round_s=12.0, now=0.0) == 0.0  # speed unknown: simply waited for


def test_a_helpers_round_reaches_averaging_when_the_others_are_projected_done():
    now, h = 1000.0, "h"
    helper = ClockRecord(5, 0, 0.0, now)  # trains nothing: no steps, no speed
    training = {"a": ClockRecord(5, 20, 2.0, now), "b": ClockRecord(5, 24, 2.0, now), h: helper}
    assert not others_done(training, 5, h, now, local_steps=24, by_speed=False)  # a is 2 s from its 24th step
    assert others_done(training, 5, h, now + 2.0, local_steps=24, by_speed=False)
    assert not others_done({**training, "b": ClockRecord(4, 3, 2.0, now)}, 5, h, now + 9, 24, False)  # landing
    assert others_done({**training, "b": ClockRecord(6)}, 5, h, now, 24, False)  # one has moved on: go
    assert not others_done({h: helper}, 5, h, now, 24)  # alone: nothing to average
    assert others_done({**training, "a": ClockRecord(5)}, 5, h, now + 2.0, 24, False)  # speed unknown: due
    assert others_done(training, 5, h, now, 24, False, quiet={"a"})  # a stopped: not waited for here


def test_roster_waits_for_members_and_the_round_behind_but_not_the_gone():
    now = 1000.0
    records = {"a": ClockRecord(5, 20, 2.0, now), "b": ClockRecord(4), "c": ClockRecord(3), "me": ClockRecord(5)}
    r = roster(records, 5, "me", now, budget=5.0, local_steps=24)
    assert r.members == ["a", "me"]  # records at the round (and this peer)
    assert r.waited == ["a", "b", "me"]  # one round behind: landing its average or seen late; c is gone
    assert r.eta == 2.0  # a: 12 s round, 10 s done
    # two reads a moment apart that differ by one member still name the same leader and the same key
    other = roster({**records, "b": ClockRecord(5)}, 5, "a", now, budget=5.0, local_steps=24)
    assert round_leader(r) == round_leader(other) == "a"


def test_a_member_projected_past_the_budget_is_not_waited_for():
    now = 1000.0
    slow = ClockRecord(5, steps=1, speed=0.05, time=now)  # 20 s done of a 120 s round
    on_time = ClockRecord(5, steps=2, speed=1.0, time=now)  # done
    # a fixed clock (every member takes H = 2 steps; under the swarm clock the slow one would get 1 step)
    r = roster({"slow": slow, "b": on_time, "me": ClockRecord(5)}, 5, "me", now, budget=5.0, local_steps=2,
               by_speed=False)
    assert r.late == ["slow"] and r.waited == ["b", "me"]
    # a joiner that came early (its first round is short) waits for the others, however long they still need
    joiner = roster({"slow": slow, "me": ClockRecord(5)}, 5, "me", now, budget=5.0, local_steps=2, by_speed=False)
    assert joiner.waited == ["me", "slow"] and joiner.eta == 20.0


def test_each_member_is_projected_from_its_own_quota():
    # A silo 1.6x faster than the others gets 11 steps of an H = 8 round (speed_quota): projected from the reader's
    # own 8-step round it looked due 4 s before it came, and the group left without it.
    now = 1000.0
    records = {"fast": ClockRecord(5, steps=4, speed=1.6, time=now), "me": ClockRecord(5, 8, 1.0, now),
               "b": ClockRecord(5, 8, 1.0, now)}
    fast_s = member_round_s(records, "fast", 5, local_steps=8)
    assert fast_s == pytest.approx(speed_quota(8, 1.6, [1.0, 1.0]) / 1.6) and speed_quota(8, 1.6, [1.0, 1.0]) == 11
    r = roster(records, 5, "me", now, budget=5.0, local_steps=8)
    assert r.waited == ["b", "fast", "me"] and r.eta == pytest.approx(fast_s - 4 / 1.6)
    # a fixed clock (round_clock: steps): every member takes H steps
    assert member_round_s(records, "fast", 5, local_steps=8, by_speed=False) == pytest.approx(8 / 1.6)


def test_round_zero_is_projected_at_h_steps_for_everyone():
    # No silo knows its own speed when it fixes its first quota, so each takes H: a half-speed silo projected from
    # speed_quota looked due a whole round early, and the group of 8 started without it.
    now = 1000.0
    records = {"half": ClockRecord(0, steps=2, speed=0.5, time=now), "me": ClockRecord(0, 8, 1.0, now),
               "b": ClockRecord(0, 8, 1.0, now)}
    assert member_round_s(records, "half", 0, local_steps=8) == pytest.approx(16.0)
    assert member_round_s(records, "half", 1, local_steps=8) < 16.0  # later rounds: its speed quota
    r = roster(records, 0, "me", now, budget=16.0, local_steps=8)
    assert r.waited == ["b", "half", "me"] and r.eta == pytest.approx(12.0)


def test_a_silent_member_is_neither_waited_for_nor_the_leader():
    # "a" has the lowest id but its record stopped moving (SIGSTOP): asking it to lead cost a churn run its round.
    now = 1000.0
    records = {"a": ClockRecord(5, 3, 1.0, now - 30), "b": ClockRecord(5, 8, 1.0, now), "me": ClockRecord(5)}
    r = roster(records, 5, "me", now, budget=5.0, local_steps=8, quiet={"a"})
    assert r.silent == ["a"] and r.waited == ["b", "me"] and round_leader(r) == "b"
    assert round_leader(roster(records, 5, "me", now, budget=5.0, local_steps=8)) == "a"


def test_the_roster_names_the_members_that_joined_into_the_round():
    now = 1000.0
    records = {"a": ClockRecord(0, 1, 0.0, now), "first": ClockRecord(0, 64, 4.0, now),
               "me": ClockRecord(0, 1, 0.0, now)}
    r = roster(records, 0, "me", now, budget=5.0, local_steps=64, joined=True)
    assert r.joiners == ["a", "me"] and round_leader(r) == "a"  # the lowest id leads, joiner or not
    # the joiner's own record not yet in the read: it knows it joined
    assert roster({"first": records["first"]}, 0, "me", now, 5.0, 64, joined=True).joiners == ["me"]
    assert roster(records, 0, "me", now, 5.0, 64).joiners == ["a"]


def test_joiners_left_at_a_round_every_trained_member_has_left_catch_up():
    # The first peer gave round 0 up alone (its joiners still booting) and moved on: the joiners that synced
    # from one another must not average round 0 among themselves (server_moved cannot see it).
    joiners = {"j1": ClockRecord(0, 1, 0.0), "j2": ClockRecord(0, 1, 0.0), "me": ClockRecord(0, 1, 0.0)}
    assert orphaned({**joiners, "first": ClockRecord(1, 3, 4.0)}, 0, "me", joined=True)
    assert not moved_on({**joiners, "first": ClockRecord(1, 3, 4.0)}, 0, "me")  # the majority rule: no
    assert not orphaned({**joiners, "first": ClockRecord(1, 3, 4.0)}, 0, "me", joined=False)  # we trained it
    assert not orphaned({**joiners, "first": ClockRecord(0, 60, 4.0)}, 0, "me", joined=True)  # it still waits
    assert not orphaned(joiners, 0, "me", joined=True)  # nobody past it: the joiners average it (a lone joiner
    # of a swarm whose every trained member crashed), under the lowest joiner
    # a silent member at the round (killed) does not hold the round open
    both = {**joiners, "first": ClockRecord(1, 3, 4.0), "dead": ClockRecord(0, 60, 4.0)}
    assert orphaned(both, 0, "me", joined=True, quiet={"dead"}) and not orphaned(both, 0, "me", joined=True)


def test_a_round_averages_once_the_peers_left_at_it_catch_up():
    # Five peers averaged round 0 and moved on; three that came later must not average round 0 among themselves.
    past = {f"p{i}": ClockRecord(1) for i in range(5)}
    late = {"me": ClockRecord(0), "x": ClockRecord(0), "y": ClockRecord(0)}
    assert moved_on({**past, **late}, 0, "me")
    assert not moved_on({"p0": ClockRecord(1), **late}, 0, "me")  # one record past the round is not the swarm
    assert not moved_on({**past, **late}, 0, "me", quiet=set(past))  # silent records do not count
    assert not moved_on(late, 0, "me") and not moved_on({}, 3, "me")


def test_a_no_show_delays_one_round_only_until_its_record_moves():
    seen = NoShows()
    records = {"dead": ClockRecord(4, 3, 1.0, 50.0), "x": ClockRecord(5)}
    assert seen.skip(records) == set()
    assert seen.note(["dead", "x", "me"], came=["x", "me"], records=records) == ["dead"]
    assert seen.skip(records) == {"dead"}  # the same record next round: not waited for again
    moved = {**records, "dead": ClockRecord(5, 0, 1.0, 60.0)}  # it reported again: alive and moving
    assert seen.skip(moved) == set()


def test_the_majority_wins_a_split_and_ties_go_to_the_smaller_fingerprint():
    assert majority({"a": "f1", "b": "f2", "c": "f2"}) == "f2"
    assert majority({"a": "f9", "b": "f1"}) == "f1"
    assert majority({}) == ""
    peers = [{"peer_id": "b", "round": 7, "fingerprint": "f2"}, {"peer_id": "c", "round": 7, "fingerprint": "f2"},
             {"peer_id": "d", "round": 6, "fingerprint": "f0"}]  # d is behind: not part of round 7's split
    assert split_winner("f1", 7, peers) == "f2"
    assert split_winner("f2", 7, peers) == ""
    assert split_winner("f1", 7, [peers[0]]) == ""  # a tie, and ours is the smaller: we keep it
    assert split_winner("f3", 7, [peers[0]]) == "f2"


def test_a_finite_run_ends_at_the_swarms_round():
    assert not run_over(9, 10) and run_over(10, 10) and run_over(12, 10)
    assert not run_over(10**6, 0)  # 0: until stopped


def test_outcomes():
    assert outcome(False, "", False, 0.0, False) is Outcome.AVERAGED
    assert outcome(False, "", True, 0.0, False) is Outcome.HEALED
    assert outcome(False, "partial", False, 0.25, False) is Outcome.PARTIAL
    assert outcome(True, "no group found", False, 0.0, False) is Outcome.MISSED
    assert outcome(True, "no group found", False, 0.0, True) is Outcome.SOLO
    assert outcome(True, "stopped", False, 0.0, False) is Outcome.STOPPED


def test_a_client_mode_peer_is_waited_for_but_never_asked_to_lead():
    # It cannot be reached: every member asking it would wait out the round.
    now = 1000.0
    records = {"a": ClockRecord(5, 8, 2.0, now, client=True), "b": ClockRecord(5, 8, 2.0, now),
               "me": ClockRecord(5, 8, 2.0, now)}
    r = roster(records, 5, "me", now, budget=5.0, local_steps=8)
    assert r.waited == ["a", "b", "me"] and r.clients == ["a"] and round_leader(r) == "b"


def test_a_member_that_comes_from_one_round_behind_becomes_the_leader():
    # A slow silo that caught up by download ("a", the lowest id) was one round behind when the others read the
    # records: they named "b" and kept it while "c" came and named itself; "a" missed 44 of 44 rounds of a CI run.
    now = 1000.0
    first = {"b": ClockRecord(10, 6, 1.0, now), "a": ClockRecord(9, 1, 1.0, now), "me": ClockRecord(10, 6, 1.0, now)}
    chosen = roster(first, 10, "me", now, budget=2.0, local_steps=6)
    assert chosen.waited == ["a", "b", "me"] and round_leader(chosen) == "b"
    later = {**first, "a": ClockRecord(10, 0, 1.0, now + 1)}
    change = fold(chosen, roster(later, 10, "me", now + 1, budget=2.0, local_steps=6))
    assert change and change.arrived == ["a"] and not change.new and not change.gone
    assert round_leader(chosen) == "a" and chosen.waited == ["a", "b", "me"]
    # nothing moved: no change, the same leader
    assert not fold(chosen, roster(later, 10, "me", now + 2, budget=2.0, local_steps=6))


def test_folding_a_joiner_and_a_silent_member_into_the_roster():
    now = 1000.0
    chosen = roster({"b": ClockRecord(3, 8, 1.0, now), "me": ClockRecord(3)}, 3, "me", now, 5.0, 8)
    later = {"a": ClockRecord(3, 6, 1.0, now), "b": ClockRecord(3, 8, 1.0, now), "me": ClockRecord(3)}
    change = fold(chosen, roster(later, 3, "me", now, 5.0, 8))
    assert change.new == ["a"] and round_leader(chosen) == "a"
    change = fold(chosen, roster(later, 3, "me", now, 5.0, 8, quiet={"a"}))
    assert change.gone == ["a"] and chosen.waited == ["b", "me"] and round_leader(chosen) == "b"


def test_a_leader_that_moved_past_the_round_is_no_longer_waited_for():
    # 13 peers at round 0 kept asking a leader that had caught up to round 1 until their deadline, 30 s
    now = 1000.0
    first = {"a": ClockRecord(0, 6, 1.0, now), "b": ClockRecord(0, 6, 1.0, now), "me": ClockRecord(0, 6, 1.0, now)}
    chosen = roster(first, 0, "me", now, budget=2.0, local_steps=6)
    assert round_leader(chosen) == "a"
    later = {**first, "a": ClockRecord(1, 0, 1.0, now + 1)}
    change = fold(chosen, roster(later, 0, "me", now + 1, budget=2.0, local_steps=6))
    assert change and change.ahead == ["a"] and chosen.waited == ["b", "me"] and "a" not in chosen.members
    # ... and the round is closed for those it began without: naming "b" instead formed a second group at the
    # round (32 peers on 2 cores: 13 with the leader, then 8 under the next-lowest id, on two models)
    assert leader_left(change, "a")


def test_a_member_other_than_the_leader_moving_past_the_round_closes_nothing():
    now = 1000.0
    first = {"a": ClockRecord(4, 6, 1.0, now), "b": ClockRecord(4, 6, 1.0, now), "me": ClockRecord(4, 6, 1.0, now)}
    chosen = roster(first, 4, "me", now, budget=2.0, local_steps=6)
    change = fold(chosen, roster({**first, "b": ClockRecord(5, 0, 1.0, now + 1)}, 4, "me", now + 1, 2.0, 6))
    assert change.ahead == ["b"] and not leader_left(change, "a") and round_leader(chosen) == "a"
    assert not leader_left(change, "")  # a grid stage names no leader


def test_one_absurd_speed_record_cannot_shrink_every_quota():
    # issue 24, item 10: samples_per_second only had to be >= 0; one record of 1e30 gave every silo one step.
    honest = [1.0, 1.1, 0.9]
    assert speed_quota(16, 1.0, honest) == 16
    assert speed_quota(16, 1.0, [*honest, 1e30]) == 10  # counted as 4x the others' median: 16 x 5 / 8
    assert speed_quota(16, 1.0, [*honest, 3.5]) == 11  # within the cap: counted as it is, 16 x 5 / 7.5
    assert speed_quota(8, 4.0, [1.0, 1.0, 1.0]) == 18 and speed_quota(8, 0.01, [10.0]) == 1  # as before


def test_a_joiner_gives_its_round_up_once_the_peer_it_joined_from_has_moved_past_it():
    records = {"server": ClockRecord(1), "j1": ClockRecord(0), "j2": ClockRecord(0), "j3": ClockRecord(0)}
    # three joiners outnumber the one peer past the round: the majority rule alone keeps them at it
    assert not moved_on(records, 0, "j1")
    assert server_moved(records, "server", 0)
    assert not server_moved(records, "j2", 0) and not server_moved(records, "", 0)
    assert not server_moved(records, "gone", 0)  # a server with no record says nothing
    assert not server_moved({"server": ClockRecord(0)}, "server", 0)


def test_a_late_joiners_first_round_is_part_of_joining_not_a_missed_round():
    assert outcome(True, "closed", False, 0.0, False, late_join=True) is Outcome.JOINED_LATE
    assert outcome(True, "closed", False, 0.0, True, late_join=True) is Outcome.SOLO  # alone: its own Δ applied
    assert outcome(False, "", False, 0.0, False, late_join=True) is Outcome.AVERAGED


def test_a_group_heals_only_on_more_than_one_members_word():
    # issue 24, item 3: one member declaring another fingerprint made the round a healing round (weights averaged,
    # no claim budget, no reducer check), and its -θ halved the model
    assert not heals(["x", "x", "x", "fake"], [False] * 4, stage=0)
    assert not heals(["x", "y"], [False, False], stage=0)  # a pair: the split rule (G2) settles it by download
    assert heals(["x", "x", "y", "y"], [False] * 4, stage=0)  # a pocket of two meets the swarm
    assert heals(["x", "x", "x", "y", "y"], [False] * 5, stage=0)
    assert not heals(["x", "", "", "y"], [False] * 4, stage=0)  # unknown is not a model
    assert not heals(["x", "x", "x"], [True, False, False], stage=0)  # "weights" means something only in stage 2
    assert heals(["x", "x", "x"], [True, False, False], stage=2)  # a healed first stage sends weights


def test_a_state_is_vouched_for_by_live_peers_other_than_its_server():
    hb = lambda p, r, fp: {"peer_id": p, "round": r, "fingerprint": fp}  # noqa: E731
    assert state_verdict("x", 5, "s", [hb("s", 5, "x"), hb("a", 5, "x"), hb("b", 5, "y"), hb("c", 5, "x")]) == ""
    # the server's own heartbeat does not count: a and b hold y at round 5
    assert "differs" in state_verdict("x", 5, "s", [hb("s", 5, "x"), hb("a", 5, "y"), hb("b", 5, "y")])
    # a far-future round nobody else reports is refused, unless the server is the swarm or the peer we joined from
    assert "to vouch" in state_verdict("x", 99, "m", [hb("m", 99, "x"), hb("a", 5, "y")])
    assert state_verdict("x", 99, "m", [hb("m", 99, "x")]) == ""
    assert state_verdict("x", 7, "m", [hb("m", 7, "x"), hb("a", 5, "y")], trusted="m") == ""
    assert "to vouch" in state_verdict("x", 7, "m", [hb("m", 7, "x"), hb("a", 5, "y"), hb("b", 5, "y")])
    # one round past the others: a first peer ahead of joiners still at round 0 (a joiner refused it once)
    assert state_verdict("x", 1, "f", [hb("f", 1, "x"), hb("j", 0, "y")]) == ""


def test_one_heartbeat_ahead_is_no_round_to_catch_up_to():
    hb = lambda p, r: {"peer_id": p, "round": r}  # noqa: E731
    assert catch_up_round([hb("m", 99), hb("a", 5), hb("b", 5)]) == 5  # one ghost at 99: not a round to chase
    assert catch_up_round([hb("m", 99), hb("a", 7), hb("b", 7)]) == 7
    assert catch_up_round([hb("a", 8), hb("b", 8), hb("c", 3)]) == 8
    assert catch_up_round([hb("m", 6)]) == 6  # the only other peer
    assert catch_up_round([hb("f", 1), hb("j", 0), hb("k", 0)], trusted="f") == 1  # the peer we joined from
    assert catch_up_round([]) == -1


def test_a_roster_projects_every_members_quota_as_speed_quota_does_in_one_sort():
    # roster() projects each member's quota over the others' speeds; Speeds sorts them once (O(n log n) a read,
    # not O(n² log n): 0.2 s at 1,000 records, every second a peer waits). The same quotas as member by member.
    import random

    from photon_p2p.federation.protocol import live_speeds

    rng = random.Random(7)
    for _ in range(400):
        records = {f"p{i}": ClockRecord(rng.choice([3, 4, 5, 5]), 0.0,
                                        rng.choice([0.0, 1.0, 1.0, 2.0, rng.uniform(0.1, 3.0), 1e30]), 0.0)
                   for i in range(rng.randint(1, 9))}
        speeds = live_speeds(records, 5)
        for member, record in records.items():
            others = [r.speed for p, r in records.items() if p != member and r.round >= 4]
            want = speed_quota(8, record.speed, others) / record.speed if record.speed > 0 else 0.0
            assert member_round_s(records, member, 5, 8, speeds=speeds) == pytest.approx(want, rel=1e-9)


def test_the_clock_reads_and_stores_less_often_as_the_swarm_grows_past_16_peers():
    # Every get or store of the clock's one DHT key moves the whole dictionary from up to 20 nodes: O(n²) bytes a
    # period. Up to 16 peers nothing changes; past that the period grows with n², capped.
    from photon_p2p.federation.hivemind_ext.progress_tracker import MAX_FETCH_S, fetch_period

    assert [fetch_period(n, 2.0) for n in (1, 8, 16)] == [2.0, 2.0, 2.0]
    assert fetch_period(32, 2.0) == pytest.approx(7.17, abs=0.01) and fetch_period(32, 3.0) == fetch_period(32, 2.0)
    assert fetch_period(100, 2.0) == pytest.approx(70.0) and fetch_period(1000, 2.0) == MAX_FETCH_S


def test_only_a_group_that_left_every_member_on_one_model_spares_the_split_rules_read():
    from types import SimpleNamespace as R
    fine = R(solo=False, partial=0.0, healed=False, fingerprints={"a": "f1", "b": "f1"}, peers=["a", "b"])
    assert one_model_group(fine) == {"a", "b"}
    assert one_model_group(R(**{**vars(fine), "healed": True, "fingerprints": {"a": "f1", "b": "f2"}})) == {"a", "b"}
    assert not one_model_group(R(**{**vars(fine), "fingerprints": {"a": "f1", "b": "f2"}}))  # a lone other model
    assert not one_model_group(R(**{**vars(fine), "partial": 0.02}))  # a reducer's part missing: mended first
    assert not one_model_group(R(**{**vars(fine), "solo": True}))
