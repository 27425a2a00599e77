"""A follower that a leader has accepted waits for the leader's answer past its step's deadline (averager_process)."""

from __future__ import annotations

import asyncio
import time

from hivemind.utils import get_dht_time

from photon_p2p.federation.averager_process import AdmittedMatchmaking

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

    async def request_leaders(step):
        await asyncio.sleep(accept_after)
        mm.current_leader = "leader"
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


def test_a_follower_nobody_accepted_leaves_at_its_deadline():
    got, took = look(0.3, "begin", 5.0, 0.0)
    assert got is None and took < 1.5


def test_a_silent_leader_is_waited_for_at_most_request_timeout():
    got, took = look(0.3, "begin", 0.1, 60.0)
    assert got is None and 2.2 < took < 5.0
