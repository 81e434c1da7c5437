"""The replicas' request router on Ray Serve's custom-router API (imports Ray; see replicas.py)."""
from __future__ import annotations

import collections
from typing import Optional

from ray.serve.request_router import RequestRouter

from .replicas import DEFAULT_IMBALANCE, MAX_CONVERSATIONS

ROUTERS: list = []  # the routers made in this process (one per deployment handle), for the replica list


class ConversationRouter(RequestRouter):
    """Sticky by conversation, spilling to the least-loaded replica beyond `imbalance` or when its own
    holds `capacity` requests (see replicas.py's module doc).

    A request may name a replica (kwargs["replica"], its unique id): it goes there or nowhere.
    """

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, capacity: Optional[int] = None) -> None:
        self.imbalance = imbalance
        self.capacity = capacity
        self.owner: collections.OrderedDict[str, str] = collections.OrderedDict()  # conversation -> replica
        self.owned: collections.Counter = collections.Counter()  # replica unique id -> conversations
        # By name: Serve may ship this class by value, with a copy of this module's globals.
        from llaisys.server import ray_router

        ray_router.ROUTERS.append(self)

    def load(self, replica) -> int:
        """Requests in flight to the replica, from Serve's own count (kept on send and completion)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        pinned = pending_request.kwargs.get("replica")
        if pinned is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pinned]]
        # Ties in load go to the replica with fewest conversations, so that idle replicas share new ones.
        by_load = sorted(candidate_replicas, key=lambda r: (self.load(r), self.owned[r.replica_id.unique_id]))
        key = pending_request.kwargs.get("route_key")
        before = self.owner.get(key) if key else None
        mine = next((r for r in candidate_replicas if r.replica_id.unique_id == before), None)
        chosen = mine if mine is not None and self.keeps(mine, by_load[0]) else by_load[0]
        if key:
            self.remember(key, before, chosen.replica_id.unique_id)
        return [[chosen], [r for r in by_load if r is not chosen]]

    def keeps(self, mine, least) -> bool:
        """Whether a conversation stays on its replica, given the least-loaded one."""
        full = self.capacity is not None and self.load(mine) >= self.capacity > self.load(least)
        return not full and self.load(mine) - self.load(least) <= self.imbalance

    def remember(self, key: str, before, chosen: str) -> None:
        if before != chosen:
            self.owned[before] -= 1
            self.owned[chosen] += 1
        self.owner[key] = chosen
        self.owner.move_to_end(key)
        if len(self.owner) > MAX_CONVERSATIONS:
            self.owned[self.owner.popitem(last=False)[1]] -= 1

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.owned.pop(replica_id.unique_id, None)
