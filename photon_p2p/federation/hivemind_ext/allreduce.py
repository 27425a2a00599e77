"""Butterfly all-reduce in which every member ends on the same bytes: mirrors hivemind/averaging/allreduce.py."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import BannedException
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, deserialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from photon_p2p.federation.compression import CountingCompression
from photon_p2p.federation.hivemind_ext.partition import OrderedPartReducer
from photon_p2p.federation.robust import ReducerCheck, RobustSettings


class ExactAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce in which every member receives the same bytes for each averaged part.

    hivemind's runner sends each sender ``compress(avg − sent)``, so members end on different values. Here a
    reducer encodes each averaged part once, with the group's codec, and streams those bytes to every sender;
    it decodes the same bytes for its own copy. A part whose reducer failed comes back as zeros (no update),
    and the reducers that failed are listed in ``failed_reducers``.
    """

    def __init__(self, *args, compression: CompressionBase = NoCompression(), ranks: list | None = None,
                 robust: RobustSettings = RobustSettings(mode="none"), claims: list[float] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, compression=compression, **kwargs)
        # Sum senders in the order of their gathered rank (then peer id): the same inputs, the same bytes.
        by_peer = dict(zip(self.ordered_peer_ids, ranks or [str(p) for p in self.ordered_peer_ids]))
        order = sorted(range(len(self.sender_peer_ids)), key=lambda i: by_peer.get(self.sender_peer_ids[i], ""))
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        # super() built hivemind's own reducer, replaced below unused: at collection its __del__ would log
        # "Reducer: received 0.0% of input tensors" as a warning in every round. Finished, it has nothing to say.
        self.tensor_part_reducer.finished.set()
        by_index = dict(zip(self.ordered_peer_ids, claims)) if claims is not None else {}
        sender_claims = [by_index.get(p) for p in self.sender_peer_ids] if claims is not None else None
        self.tensor_part_reducer = OrderedPartReducer(shapes, len(self.sender_peer_ids), order, robust,
                                                      sender_claims)
        # Check every reducer's averages against the senders' claims (robust.ReducerCheck): a part beyond the
        # bound is replaced by zeros (no update), the same on every member, and the reducer is reported.
        self.check = ReducerCheck(claims) if claims is not None and robust.mode != "none" else None
        register = self.tensor_part_container.register_processed_part

        def checked(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if self.check is not None and not self.check.accept(peer_index, part):
                part = torch.zeros_like(part)
            register(peer_index, part_index, part)

        self.tensor_part_container.register_processed_part = checked
        # Encode results without counting (bytes are counted per message actually sent, below).
        self._codec = compression.inner if isinstance(compression, CountingCompression) else compression
        self._counter = compression.counter if isinstance(compression, CountingCompression) else None
        self._encoded: dict[int, asyncio.Future] = {}
        self._fetched: dict[int, int] = {}
        self.failed_reducers: list = []
        self.failures: dict[str, str] = {}  # reducer peer id: why its part failed (hivemind logs it at debug only)

    def clipped(self) -> dict[str, float]:
        """{sender peer id: smallest share of its contribution this reducer kept} for the senders it clipped or
        dropped (0.0 = dropped: non-finite, or past its declared norm); empty when everyone was within bounds."""
        return {str(self.sender_peer_ids[i]): f for i, f in self.tensor_part_reducer.factors.items()}

    def rejected(self) -> list[str]:
        """Reducers whose returned averages exceeded what their senders' declared norms allow."""
        return sorted(str(self.ordered_peer_ids[i]) for i in (self.check.rejected if self.check else ()))

    async def _encoded_average(self, part_index: int, averaged: torch.Tensor) -> runtime_pb2.Tensor:
        """The averaged part, compressed once; every caller gets the very same message."""
        if part_index not in self._encoded:
            info = CompressionInfo.from_tensor(averaged, key=part_index)
            loop = asyncio.get_event_loop()
            self._encoded[part_index] = asyncio.ensure_future(
                loop.run_in_executor(None, lambda: self._codec.compress(averaged, info)))
        message = await self._encoded[part_index]
        self._fetched[part_index] = self._fetched.get(part_index, 0) + 1
        if self._fetched[part_index] >= len(self.sender_peer_ids):
            del self._encoded[part_index]  # every sender has it: free the bytes early
        return message

    async def _communicate_with_peer(self, peer_id) -> None:
        if peer_id != self.peer_id:
            try:
                return await super()._communicate_with_peer(peer_id)
            except BaseException as e:
                self.failed_reducers.append(peer_id)
                self.failures[str(peer_id)] = repr(e)[:200]
                raise
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        loop = asyncio.get_event_loop()
        for part_index, part in enumerate(self.parts_for_local_averaging):
            # Our own contribution goes through the codec like every remote one: two groups fed the same
            # inputs must compute the same bytes whichever member happens to reduce a part (groups.py).
            info = CompressionInfo.from_tensor(part, key=part_index)
            part = await loop.run_in_executor(None, lambda: self._codec.extract(self._codec.compress(part, info)))
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                     weight=self.weight)
            message = await self._encoded_average(part_index, averaged)
            decoded = await loop.run_in_executor(None, self._codec.extract, message)
            self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                          sender_index: int):
        part_index = 0
        try:
            async for part, weight in amap_in_executor(
                    lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight), stream,
                    max_prefetch=self.tensor_part_container.prefetch):
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                             weight=weight)
                    part_index += 1
                except BannedException:
                    break  # the sender was banned meanwhile: it gets nothing more
                message = await self._encoded_average(part_index - 1, averaged)
                if self._counter is not None:
                    self._counter.add_sent(message.ByteSize())
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=message)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
