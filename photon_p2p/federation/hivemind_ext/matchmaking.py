"""hivemind's matchmaking with admission and with no "ghost" members: mirrors hivemind/averaging/matchmaking.py."""

# A ghost is a peer a leader counts in its group that never joins it. The leader then runs the all-reduce with
# it, loses its parts (a partial round) and the ghost averages nothing: in a grid round (groups.py) that is a
# column that failed, and the two rows' members leave the round on different models. hivemind makes ghosts in two
# places, both fixed here:
# - a follower waits ``request_timeout`` for a leader's first answer, holding its join lock (that breaks the
#   deadlock of two peers asking each other), then walks away; but a leader sends "accepted" and, when that fills
#   its group, assembles it in the same breath. Under CPU load the answer takes longer than request_timeout
#   (0.75 s with the tests' 1.5 s matchmaking window), and the follower is a ghost. ``_request_join_group`` keeps
#   hivemind's request_timeout with the lock held, then goes on waiting for the answer WITHOUT the lock (so no
#   deadlock) until the request's expiration, and joins if it was accepted.
# - a follower the leader accepted gives up at its step's deadline while the leader's "begin" is on its way
#   (``look_for_group``: waits for the begin/disband past the deadline, at most request_timeout). Likewise a
#   follower whose request is still unanswered at its deadline (``pending_leader``): the leader may accept it
#   and fill its group a moment later.

from __future__ import annotations

import asyncio
import logging
from math import isfinite
from typing import Any

from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.asyncio import anext, cancel_and_wait

log = logging.getLogger("photon_p2p.federation")


def _round_of(data_for_gather: Any) -> tuple | None:
    """(round, stage) from a step's gathered metadata as hivemind serializes it ([bandwidth, mode, user data]);
    None if it cannot be read."""
    try:
        user = MSGPackSerializer.loads(MSGPackSerializer.loads(data_for_gather)[2])
        return (user.get("round"), user.get("stage", 0)) if isinstance(user, dict) else None
    except Exception:  # not ours, truncated or garbage: no round
        return None


class AdmittedMatchmaking(Matchmaking):
    """hivemind's matchmaking that never asks a non-admitted peer to lead it (nor follows one it is redirected
    to), and that leaves no ghost members (comment atop this module). ``gate``: an AdmissionGate (averager.py)
    or None in an open swarm."""

    def __init__(self, *args, gate: Any = None, **kwargs) -> None:
        self.gate = gate
        self.round_leader: PeerID | None = None  # the step's designated leader (set before each step)
        self.pending_leader: PeerID | None = None  # asked to join, no answer yet (it may count us in any moment)
        super().__init__(*args, **kwargs)

    async def _request_join_potential_leaders(self, step):
        """Ask the round's designated leader until it takes us or the step ends; hivemind's search only for a step
        that names no leader (a grid's stages). Every peer of a round names the same leader (the lowest reachable
        peer id of its roster, protocol.round_leader), so they meet in ONE group without waiting to discover each
        other through the DHT: that discovery lags under load, and 16 peers each leading a few followers formed
        2-5 groups per round. Nobody else leads, so a round forms one group or fewer members than it waited
        for, never two (G1): those the leader began without catch up (swarm.py), as any peer that missed it.
        - The designated leader asks no one: it waits to be joined (hivemind's handler assembles the group at its
          expiration). Had it searched, it could follow a member that had begun leading, and the rest of the
          round, told NOT_A_LEADER, formed a second group (3 + 5 of 8 peers, two models, seen at start-up).
        - A follower that is refused asks again. Falling back to hivemind's search after a refusal, or after a few
          seconds, let the peers a leader had begun without form a group of their own: two models (16 peers).
        - The designated leader changes while we ask when it goes silent, or when a record we had missed names a
          lower id (``round_leader`` is set anew); then we ask the new one, or lead if it is us."""
        if self.round_leader is None:
            return await super()._request_join_potential_leaders(step)
        async with self.potential_leaders.begin_search(step, self.group_key_manager, declare=not self.client_mode):
            group = await self._ask_round_leader()
            return group if group is not None else await self._search()

    async def _ask_round_leader(self):
        """The designated-leader search: the group once it assembles; None once the step names no leader."""
        while not self.assembled_group.done():
            leader = self.round_leader
            if leader is None:
                return None
            if leader == self.peer_id:
                await asyncio.wait({self.assembled_group}, timeout=0.2)
                continue
            group = await self._ask_designated(leader)
            if group is not None:
                return group
            if self.round_leader == leader and not self.assembled_group.done():
                await asyncio.sleep(0.2)  # refused (still training, or began without us): ask again
        return self.assembled_group.result()

    async def _search(self):
        """hivemind's search (Matchmaking._request_join_potential_leaders, inside the same begin_search): the
        leader with the earliest expiration, then the lowest id, takes the others; at our own expiration we lead
        whoever joined us."""
        while True:
            try:
                group = await self._request_join_group(await self.potential_leaders.pop_next_leader())
                if group is not None:
                    return group
            except asyncio.TimeoutError:  # our declared expiration came
                async with self.lock_request_join_group:
                    if self.assembled_group.done():
                        return self.assembled_group.result()
                    if len(self.current_followers) + 1 >= self.min_group_size:
                        return await self.leader_assemble_group()
                    if len(self.current_followers) > 0:
                        await self.leader_disband_group()
            except asyncio.CancelledError:
                return None
            except Exception as e:
                if not self.assembled_group.done():
                    self.assembled_group.set_exception(e)
                raise

    def designated_elsewhere(self) -> bool:
        """Whether the step names a leader other than us: then we assemble no group (leader_assemble_group)."""
        return self.round_leader is not None and self.round_leader != self.peer_id

    async def leader_assemble_group(self):
        """hivemind's, but only the step's designated leader assembles a group (G1). A peer that began leading
        on a read that lacked a lower id (a joiner's record not yet seen, or a member that came from one round
        behind) learns of it while it waits (swarm.py's ``follow`` names the new leader); were it to assemble at its
        expiration or once "full", its followers and the new leader's would average the round as two groups, on
        two models (round 0 of a CI run: 2 + 6 of 8). It disbands instead: its followers are sent to the new
        leader once that one accepts us (hivemind's GROUP_DISBANDED with suggested_leader), or at our expiration
        they ask their own designated leader again."""
        if self.designated_elsewhere():
            log.debug("not assembling: %s leads this step", str(self.round_leader)[-6:])
            await self.leader_disband_group()
            return None
        return await super().leader_assemble_group()

    def _check_reasons_to_reject(self, request, context):
        """hivemind's checks, except that the designated leader takes its round's members whatever expiration
        they declared: each peer sizes its wait from its own round, and a follower whose window ended a slot
        before ours was told BAD_EXPIRATION_TIME and went off to lead a group of its own. The handler still
        assembles at OUR expiration, and an accepted follower waits for our "begin" until its step's deadline
        (``_join``)."""
        step = getattr(self, "step_control", None)
        if step is not None and self.is_looking_for_group and \
                _round_of(step.data_for_gather) != _round_of(request.gather):
            # A step cancelled as its peer caught up can still be looking when the next round's group bits are set:
            # it then asked under the new round's key with the old round's metadata, and every member of that
            # group discarded it (15 of 16 peers lost a round). Only the same round and stage meet.
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.BAD_GROUP_KEY)
        if self.round_leader is not None and self.round_leader == self.peer_id and \
                isfinite(self.potential_leaders.declared_expiration_time):
            relaxed = averaging_pb2.JoinRequest()
            relaxed.CopyFrom(request)
            relaxed.expiration = max(request.expiration, self.potential_leaders.declared_expiration_time)
            request = relaxed
        return super()._check_reasons_to_reject(request, context)

    async def _ask_designated(self, leader: PeerID):
        """_request_join_group(leader), abandoned if the designated leader changes before it accepts us: our
        daemon saw its record go silent (a stopped process). A stopped leader answers nothing, and waiting out
        the request (up to the round's whole wait) cost a churn run its round."""
        task = asyncio.ensure_future(self._request_join_group(leader))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if self.round_leader != leader and self.current_leader != leader:
                    await cancel_and_wait(task)
                    log.debug("designated leader %s went silent; asking %s", str(leader)[-6:],
                              str(self.round_leader)[-6:] if self.round_leader else "nobody")
                    return None
        except asyncio.CancelledError:
            # hivemind cancels the search once a group has assembled: the request must not outlive it, holding
            # the join lock or following a leader into the next step (a grid's column stage then failed)
            await cancel_and_wait(task)
            raise

    async def _request_join_group(self, leader: PeerID):
        if self.gate is not None and not await self.gate.allows(leader):
            return None  # as if the leader had rejected us: look for the next one
        return await self._join(leader)

    async def _join(self, leader: PeerID):
        """hivemind's _request_join_group, but a leader's first answer is awaited until the request expires
        (the lock only for request_timeout, as hivemind holds it)."""
        assert self.is_looking_for_group and self.current_leader is None
        stream, first = None, None
        try:
            async with self.lock_request_join_group:
                leader_stub = self._servicer_type.get_stub(self._p2p, leader, namespace=self._prefix)
                request_expiration_time = self.get_request_expiration_time()
                stream = await leader_stub.rpc_join_group(averaging_pb2.JoinRequest(
                    schema_hash=self.schema_hash, expiration=request_expiration_time, client_mode=self.client_mode,
                    gather=self.step_control.data_for_gather, group_key=self.group_key_manager.current_key))
                first = asyncio.ensure_future(anext(stream))
                self.pending_leader = leader
                await asyncio.wait({first}, timeout=self.request_timeout)
                if first.done() and first.result().code == averaging_pb2.ACCEPTED:
                    await self._follow(leader)
                if first.done():
                    self.pending_leader = None
            if not first.done():
                # The leader may have accepted us and counted us in its group already: do not walk away. Without
                # the lock our own rpc_join_group can answer others, so two peers asking each other still part.
                late = max(0.0, request_expiration_time - get_dht_time()) + self.request_timeout
                await asyncio.wait({first}, timeout=late)
                self.pending_leader = None
                if not first.done():
                    log.debug("potential leader %s did not answer within %.2f s", str(leader)[-6:],
                              self.request_timeout + late)
                    return None
                if first.result().code == averaging_pb2.ACCEPTED:
                    async with self.lock_request_join_group:
                        if self.assembled_group.done() or self.current_leader is not None:
                            return None  # we lead a group of our own meanwhile (or follow another leader)
                        log.debug("accepted by leader %s past request_timeout", str(leader)[-6:])
                        await self._follow(leader)

            message = first.result()
            if message.code != averaging_pb2.ACCEPTED:
                log.debug("requested %s to be our leader, rejected with %s", str(leader)[-6:],
                          averaging_pb2.MessageCode.Name(message.code))
                return None

            async with self.potential_leaders.pause_search():
                # The leader begins at ITS expiration, which may be later than ours (_check_reasons_to_reject)
                step_deadline = getattr(self.step_control, "deadline", None) or request_expiration_time
                time_to_expiration = max(0.0, max(request_expiration_time, step_deadline) - get_dht_time())
                message = await asyncio.wait_for(anext(stream), time_to_expiration + self.request_timeout)
                if message.code == averaging_pb2.BEGIN_ALLREDUCE:
                    async with self.lock_request_join_group:
                        return await self.follower_assemble_group(leader, message)

            if message.code in (averaging_pb2.GROUP_DISBANDED, averaging_pb2.CANCELLED):
                if message.suggested_leader:
                    suggested_leader = PeerID(message.suggested_leader)
                    if suggested_leader != self.peer_id:
                        self.current_leader = None
                        try:
                            await stream.aclose()
                        except RuntimeError as e:
                            log.debug("%s", e)
                        return await self._request_join_group(suggested_leader)  # the gate checks it too
                return None
            log.debug("unexpected message from leader: %s", averaging_pb2.MessageCode.Name(message.code))
            return None
        except asyncio.TimeoutError:
            return None
        except (P2PDaemonError, P2PHandlerError, StopAsyncIteration):
            log.debug("failed to request potential leader %s", str(leader)[-6:], exc_info=True)
            return None
        finally:
            self.pending_leader = None
            if first is not None and not first.done():
                await cancel_and_wait(first)
            self.was_accepted_to_group.clear()
            self.current_leader = None
            if stream is not None:
                try:
                    await stream.aclose()
                except RuntimeError as e:
                    log.debug("%s", e)

    async def _follow(self, leader: PeerID) -> None:
        """Accepted by ``leader`` (with the join lock held): follow it, and send our own followers to it."""
        self.current_leader = leader
        self.was_accepted_to_group.set()
        if len(self.current_followers) > 0:
            await self.leader_disband_group()

    async def look_for_group(self, step):
        """hivemind's look_for_group, but a follower that a leader has accepted does not walk away at its step's
        deadline. hivemind gives up the moment the deadline passes, even while it waits for the leader's "begin":
        a leader that assembled the group a moment earlier (the group was full, or its own expiration came) then
        runs the all-reduce with a member that has left. That member's parts fail (a partial round), or, on the
        gloo path, the others wait out the bulk timeout: seen under CPU load as two row partners on different
        bytes. The same for a request the leader has not answered yet: it may accept us and fill its group with us
        a moment later. Waiting for the leader's answer costs at most request_timeout past the deadline."""
        async with self.looking_for_group(step):
            request_leaders_task = asyncio.create_task(self._request_join_potential_leaders(step))
            try:
                # asyncio.wait, not wait_for: the future must stay uncancelled while a leader may still answer
                await asyncio.wait({self.assembled_group}, timeout=step.get_timeout())
                leader, grace_start = self.current_leader or self.pending_leader, get_dht_time()
                while not self.assembled_group.done() and \
                        (self.current_leader is not None or self.pending_leader is not None) and \
                        get_dht_time() < grace_start + (self.request_timeout or 5.0):
                    await asyncio.wait({self.assembled_group}, timeout=0.05)
                if leader is not None:
                    log.debug("accepted by leader %s as the step's deadline passed: waited %.2f s for it (%s)",
                              str(leader)[-6:], get_dht_time() - grace_start,
                              "group assembled" if self.assembled_group.done() else "no group")
                if self.assembled_group.done():
                    return self.assembled_group.result()
                return None
            except BaseException as e:
                if len(self.current_followers) > 0:
                    async with self.lock_request_join_group:
                        await self.leader_disband_group()
                if not self.assembled_group.done():
                    self.assembled_group.set_exception(e)
                raise
            finally:
                await cancel_and_wait(request_leaders_task)
                self.assembled_group.cancel()
                while len(self.current_followers) > 0:
                    await self.follower_was_discarded.wait()
                    self.follower_was_discarded.clear()
                self.assembled_group = asyncio.Future()
                self.was_accepted_to_group.clear()
