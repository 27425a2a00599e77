"""A part reducer that sums senders in a canonical order: mirrors hivemind/averaging/partition.py."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.partition import BannedException, TensorPartReducer

from photon_p2p.federation.robust import ClaimBudget, RobustSettings, reduce_part


def _rank(gathered: Any, peer_id: str) -> tuple:
    """A member's place in the canonical summation order: its gathered rank, then its peer id."""
    rank = gathered.get("rank", 0) if isinstance(gathered, dict) else 0
    return (rank if isinstance(rank, int) else 0, peer_id)


class OrderedPartReducer(TensorPartReducer):
    """hivemind's part reducer, but parts are summed in a fixed sender order once all have arrived.

    Zero-weight contributions are skipped: a zero-weight sender only receives the average. With ``robust`` on,
    each sender's influence on the part is bounded and non-finite chunks are dropped (robust.py).
    """

    def __init__(self, part_shapes, num_senders: int, order: list[int],
                 robust: RobustSettings = RobustSettings(mode="none"),
                 claims: list[float | None] | None = None) -> None:
        self.order, self._pending, self.robust = list(order), {}, robust
        self._budget = ClaimBudget(claims) if claims is not None and robust.mode != "none" else None
        self.factors: dict[int, float] = {}  # sender index -> smallest share of its contribution kept (robust.py)
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._pending = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException("attempted to aggregate a part in a finalized reducer")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._pending[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            parts = [self._pending.get(i, (None, 0.0))[0] for i in range(self.num_senders)]
            weights = [self._pending.get(i, (None, 0.0))[1] for i in range(self.num_senders)]
            spent: dict[int, float] = {}  # no sender counts beyond its own declared norm (robust.ClaimBudget)
            caps = self._budget.caps() if self._budget is not None else None
            try:
                averaged, factors = reduce_part(parts, weights, self.order, self.robust, caps, spent)
            except ValueError:  # every sender had weight 0: hivemind's reducer divides by zero here too
                averaged, factors = self.accumulator.div_(self.denominator), {}
            if self._budget is not None:
                self._budget.spend(spent)
            for index, factor in factors.items():
                self.factors[index] = min(factor, self.factors.get(index, 1.0))
            self.current_part_future.set_result(averaged)
            self.reset_accumulators()
