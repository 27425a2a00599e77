"""No ghost members (federation/hivemind_ext/matchmaking.py): a follower waits for a leader's late "accepted" (past
request_timeout) and for its "begin" past the step's deadline, so a leader never counts a member that walked away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

from hivemind.averaging.matchmaking import Matchmaking
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from photon_p2p.federation.hivemind_ext.matchmaking import AdmittedMatchmaking

GROUP = object()  # stands for the GroupInfo a leader's "begin" message carries


class Step:
    def __init__(self, timeout: float) -> None:
        self.deadline = get_dht_time() + timeout

    def get_timeout(self) -> float:
        return max(0.0, self.deadline - get_dht_time())


def matchmaking(leader_answers: str, accept_after: float, answer_after: float) -> AdmittedMatchmaking:
    """A follower whose only leader accepts it after ``accept_after`` s and answers ("begin" or "disband") after
    ``answer_after`` s more, the way hivemind's _request_join_group sets current_leader and assembled_group."""
    mm = object.__new__(AdmittedMatchmaking)  # only the state look_for_group touches
    mm.lock_looking_for_group, mm.lock_request_join_group = asyncio.Lock(), asyncio.Lock()
    mm.step_control, mm.current_leader, mm.current_followers = None, None, {}
    mm.assembled_group, mm.was_accepted_to_group = asyncio.Future(), asyncio.Event()
    mm.follower_was_discarded, mm.request_timeout = asyncio.Event(), 2.0
    mm.pending_leader = None

    async def request_leaders(step):
        mm.pending_leader = "leader"  # asked at once; the answer comes after accept_after (as _join tracks it)
        await asyncio.sleep(accept_after)
        mm.pending_leader, mm.current_leader = None, "leader"
        await asyncio.sleep(answer_after)
        if leader_answers == "begin":
            mm.assembled_group.set_result(GROUP)
        mm.current_leader = None
        await asyncio.sleep(3600)  # hivemind keeps looking for other leaders until cancelled

    mm._request_join_potential_leaders = request_leaders
    return mm


def look(timeout: float, *how) -> tuple[object, float]:
    async def main():  # asyncio's futures and events belong to this loop
        mm, t0 = matchmaking(*how), time.monotonic()
        got = await mm.look_for_group(Step(timeout))
        return got, time.monotonic() - t0
    return asyncio.run(main())


def test_an_accepted_follower_takes_the_group_its_leader_begins_after_the_deadline():
    # hivemind's own look_for_group returns None at 0.3 s here, while the leader runs the all-reduce with it
    got, took = look(0.3, "begin", 0.2, 0.4)  # accepted at 0.2 s, "begin" at 0.6 s
    assert got is GROUP and 0.55 < took < 1.5


def test_a_follower_whose_leader_disbands_gives_up_at_once():
    got, took = look(0.3, "disband", 0.2, 0.4)
    assert got is None and 0.55 < took < 1.5


def test_a_follower_whose_request_is_answered_after_the_deadline_takes_the_group():
    # the leader accepts at 0.5 s (its group full with us), "begin" at 0.6 s: leaving at 0.3 s made a ghost
    got, took = look(0.3, "begin", 0.5, 0.1)
    assert got is GROUP and 0.55 < took < 1.5


def test_a_follower_nobody_answered_leaves_at_most_request_timeout_past_its_deadline():
    got, took = look(0.3, "begin", 5.0, 0.0)
    assert got is None and 2.2 < took < 3.5


def test_a_silent_leader_is_waited_for_at_most_request_timeout():
    got, took = look(0.3, "begin", 0.1, 60.0)
    assert got is None and 2.2 < took < 5.0


# ---- a leader whose "accepted" comes after request_timeout (_request_join_group) ---------------------------------

class LateLeader:
    """A leader that answers a join request with "accepted" after ``accept_after`` s, then "begin" (it counted the
    follower in its group the moment it accepted, as hivemind's rpc_join_group does when that fills the group)."""

    def __init__(self, accept_after: float) -> None:
        self.accept_after = accept_after

    def get_stub(self, p2p, leader, namespace):
        return self

    async def rpc_join_group(self, request):
        async def answers():
            await asyncio.sleep(self.accept_after)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)
            await asyncio.sleep(0.05)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.BEGIN_ALLREDUCE)
        return answers()


def follower(accept_after: float, expires_in: float) -> AdmittedMatchmaking:
    """A follower looking for a group (request_timeout 0.2 s) whose request to LateLeader expires in ``expires_in``."""
    mm = object.__new__(AdmittedMatchmaking)
    mm.gate, mm.request_timeout = None, 0.2
    mm.lock_looking_for_group, mm.lock_request_join_group = asyncio.Lock(), asyncio.Lock()
    mm.current_leader, mm.current_followers, mm.pending_leader = None, {}, None
    mm.assembled_group, mm.was_accepted_to_group = asyncio.Future(), asyncio.Event()
    mm._servicer_type, mm._p2p, mm._prefix = LateLeader(accept_after), None, "test"
    mm.schema_hash, mm.client_mode, mm.peer_id = b"0123456789abcdef", False, "follower"
    mm.step_control = SimpleNamespace(data_for_gather=b"")
    mm.group_key_manager = SimpleNamespace(current_key="test.0b1")
    expiration = get_dht_time() + expires_in
    mm.get_request_expiration_time = lambda: expiration

    @contextlib.asynccontextmanager
    async def pause_search():
        yield
    mm.potential_leaders = SimpleNamespace(pause_search=pause_search, declared_expiration_time=float("inf"))

    async def follower_assemble_group(leader, message):
        return GROUP
    mm.follower_assemble_group = follower_assemble_group
    return mm


def join(join_fn, accept_after: float, expires_in: float, probe_lock_at: float | None = None,
         probe=lambda mm: not mm.lock_request_join_group.locked()):
    """``probe`` (at ``probe_lock_at`` s): by default, can our own rpc_join_group answer others meanwhile?"""
    async def main():
        mm = follower(accept_after, expires_in)
        async with mm.lock_looking_for_group:  # is_looking_for_group
            t0, task = time.monotonic(), asyncio.create_task(join_fn(mm, "leader"))
            seen = None
            if probe_lock_at is not None:
                await asyncio.sleep(probe_lock_at)
                seen = probe(mm)
            got = await task
            assert mm.pending_leader is None  # answered or not, nothing is pending once the join returns
            return got, time.monotonic() - t0, seen
    return asyncio.run(main())


def test_a_follower_accepted_after_request_timeout_joins_the_group_instead_of_becoming_a_ghost():
    # hivemind's own _request_join_group gives up at request_timeout (0.2 s), while the leader counts it in
    got, took, _ = join(Matchmaking._request_join_group, 0.5, 2.0)
    assert got is None and took < 0.45
    got, took, lock_free = join(AdmittedMatchmaking._request_join_group, 0.5, 2.0, probe_lock_at=0.35)
    assert got is GROUP and 0.5 < took < 1.5
    assert lock_free  # past request_timeout the join lock is released: two peers asking each other still part
    got, took, pending = join(AdmittedMatchmaking._request_join_group, 0.5, 2.0, probe_lock_at=0.35,
                              probe=lambda mm: mm.pending_leader)
    assert got is GROUP and pending == "leader"  # look_for_group's grace waits for this answer too


def test_a_leader_that_never_answers_is_left_when_the_request_expires():
    got, took, _ = join(AdmittedMatchmaking._request_join_group, 60.0, 0.6)
    assert got is None and 0.7 < took < 2.0  # expiration 0.6 s + request_timeout 0.2 s


def test_a_designated_leader_that_goes_silent_is_left_at_once_for_the_next():
    # A SIGSTOPped designated leader answers nothing: waiting out the request (here 30 s) cost a churn run its
    # round. Once the daemon names another leader (the old one's clock record went silent), the follower asks it.
    async def main():
        mm = follower(60.0, 30.0)
        mm.round_leader = "leader"
        asked = []

        async def request(leader):
            asked.append(leader)
            if leader == "leader":
                return await AdmittedMatchmaking._request_join_group(mm, leader)
            return GROUP
        mm._request_join_group = request

        async def silence():
            await asyncio.sleep(0.5)
            mm.round_leader = "next"
        async with mm.lock_looking_for_group:
            t0, _ = time.monotonic(), asyncio.create_task(silence())
            got = await mm._ask_round_leader()
            return got, time.monotonic() - t0, asked
    got, took, asked = asyncio.run(main())
    assert got is GROUP and asked == ["leader", "next"] and took < 2.0


def test_a_clock_record_that_stops_moving_goes_silent(monkeypatch):
    # Judged on our own clock (silo clocks may disagree), against the last read in which any record moved.
    from photon_p2p.federation.hivemind_ext import progress_tracker as pt
    now = [100.0]
    monkeypatch.setattr(pt, "time", SimpleNamespace(monotonic=lambda: now[0]))
    tracker, rec = SimpleNamespace(heard={}, fresh=0.0), (lambda t: SimpleNamespace(time=t))
    pt.RoundTracker.observe(tracker, {"a": rec(1.0), "b": rec(1.0), "gone": rec(1.0)})
    now[0] = 113.0
    pt.RoundTracker.observe(tracker, {"a": rec(11.0), "b": rec(1.0)})  # a stored again; b did not; gone expired
    assert pt.RoundTracker.silent(tracker, 12.0) == {"b"} and "gone" not in tracker.heard
    # our own reads stall (an overloaded DHT: the same values again and again): nobody else goes silent
    now[0] = 200.0
    pt.RoundTracker.observe(tracker, {"a": rec(11.0), "b": rec(1.0)})
    assert pt.RoundTracker.silent(tracker, 12.0) == {"b"}


def test_a_cancelled_search_takes_its_request_to_the_designated_leader_with_it():
    # hivemind cancels the search when a group assembles; an orphaned request went on into the next step.
    async def main():
        mm = follower(60.0, 30.0)
        mm.round_leader = "leader"
        async with mm.lock_looking_for_group:
            search = asyncio.create_task(mm._ask_round_leader())
            await asyncio.sleep(0.3)  # asking the leader, which has not answered
            search.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await search
            await asyncio.sleep(0)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return mm.lock_request_join_group.locked(), others
    locked, others = asyncio.run(main())
    assert not locked and not others


def test_the_designated_leader_asks_no_one_and_takes_the_group_it_is_joined_by():
    # Had it searched, it could follow a member that had begun leading, and the rest, told NOT_A_LEADER, formed a
    # second group: 3 + 5 of 8 peers on two models, seen at start-up.
    async def main():
        mm = follower(60.0, 30.0)
        mm.peer_id = mm.round_leader = "me"
        declared = []

        @contextlib.asynccontextmanager
        async def begin_search(step, key_manager, declare):
            declared.append(declare)  # it must be declared: followers asking an undeclared one hear NOT_DECLARED
            yield
        mm.potential_leaders.begin_search = begin_search
        asked = []
        mm._request_join_group = asked.append

        async def searched():
            raise AssertionError("the designated leader searched for another leader")
        mm._search = searched

        async def joined():  # hivemind's handler assembles the group at our expiration
            await asyncio.sleep(0.5)
            mm.assembled_group.set_result(GROUP)
        async with mm.lock_looking_for_group:
            t0, _ = time.monotonic(), asyncio.create_task(joined())
            got = await mm._request_join_potential_leaders(None)
            return got, time.monotonic() - t0, asked, declared
    got, took, asked, declared = asyncio.run(main())
    assert got is GROUP and asked == [] and declared == [True] and 0.4 < took < 1.5


def test_a_refused_follower_asks_the_designated_leader_again_instead_of_leading():
    # BAD_EXPIRATION_TIME or NOT_A_LEADER from the designated leader used to send the follower to hivemind's search,
    # where it led a group of its own; so did a leader that had begun without it (GROUP_IS_FULL).
    async def main():
        mm = follower(60.0, 30.0)
        mm.round_leader = "leader"
        answers = [averaging_pb2.BAD_EXPIRATION_TIME, averaging_pb2.NOT_A_LEADER, averaging_pb2.GROUP_IS_FULL,
                   averaging_pb2.NOT_LOOKING_FOR_GROUP]
        asked = []

        async def request(leader):
            asked.append(leader)
            if answers:
                answers.pop(0)  # refused with this code
                return None
            return GROUP
        mm._request_join_group = request
        async with mm.lock_looking_for_group:
            return await mm._ask_round_leader(), asked
    got, asked = asyncio.run(main())
    assert got is GROUP and asked == ["leader"] * 5


def test_the_designated_leader_takes_a_member_whose_window_ends_before_its_own(monkeypatch):
    def check(round_leader, request_expiration):
        mm = object.__new__(AdmittedMatchmaking)
        mm.peer_id, mm.round_leader = "me", round_leader
        mm.potential_leaders = SimpleNamespace(declared_expiration_time=100.0, declared_group_key="k")
        seen = []
        monkeypatch.setattr(Matchmaking, "_check_reasons_to_reject",
                            lambda self, request, context: seen.append(request.expiration))
        mm._check_reasons_to_reject(averaging_pb2.JoinRequest(expiration=request_expiration), None)
        return seen[0]
    assert check("me", 97.0) == 100.0  # the designated leader: hivemind sees our own expiration, no rejection
    assert check("me", 103.0) == 103.0
    assert check("other", 97.0) == 97.0  # anyone else keeps hivemind's rule
    assert check(None, 97.0) == 97.0


def test_only_the_designated_leader_assembles_a_group(monkeypatch):
    # A peer that began leading on a read without a lower id, and learned of it while it waited, assembles nothing
    # at its expiration or once "full": its followers and the new leader's averaged round 0 as two groups (2 + 6).
    assembled = []

    async def hivemind_assembles(self):
        assembled.append(self.peer_id)
        return GROUP
    monkeypatch.setattr(Matchmaking, "leader_assemble_group", hivemind_assembles)

    async def main(round_leader):
        mm = object.__new__(AdmittedMatchmaking)
        mm.peer_id, mm.round_leader, mm.client_mode = "me", round_leader, False
        mm.current_followers = {"follower": object()}
        mm.lock_request_join_group = asyncio.Lock()
        async with mm.lock_request_join_group:
            return await mm.leader_assemble_group(), mm.current_followers
    got, followers = asyncio.run(main("lower"))
    assert got is None and followers == {} and assembled == []  # disbanded: the followers ask again
    got, followers = asyncio.run(main("me"))
    assert got is GROUP and assembled == ["me"] and followers
    got, _ = asyncio.run(main(None))  # a step that names no leader (a grid's stage): hivemind's rules
    assert got is GROUP and assembled == ["me", "me"]


def test_a_leader_refuses_a_step_of_another_round_that_asks_under_its_key():
    # A step cancelled as its peer caught up was still looking when the next round's group bits were set: it asked
    # under the new round's key with the old round's metadata, and every member discarded that group.
    import threading
    from types import SimpleNamespace

    from hivemind.proto import averaging_pb2
    from hivemind.utils import MSGPackSerializer as S

    from photon_p2p.federation.hivemind_ext.matchmaking import AdmittedMatchmaking, _round_of

    def data(round_no, stage=0):
        return S.dumps([1.0, 0, S.dumps({"round": round_no, "stage": stage, "weight": 1.0})])

    assert _round_of(data(3)) == (3, 0) and _round_of(b"garbage") is None
    mm = object.__new__(AdmittedMatchmaking)
    mm.lock_looking_for_group = threading.Lock()
    mm.lock_looking_for_group.acquire()  # looking for a group
    mm.step_control = SimpleNamespace(data_for_gather=data(4))
    refused = AdmittedMatchmaking._check_reasons_to_reject(mm, averaging_pb2.JoinRequest(gather=data(3)), None)
    assert refused is not None and refused.code == averaging_pb2.BAD_GROUP_KEY
    refused = AdmittedMatchmaking._check_reasons_to_reject(mm, averaging_pb2.JoinRequest(gather=data(4, 1)), None)
    assert refused is not None and refused.code == averaging_pb2.BAD_GROUP_KEY  # another stage
