"""Ray Serve request router: a conversation goes back to the replica that served it before (its
KV rows still hold the conversation's tokens: the engine reuses them, runtime/kv_rows.py),
unless that replica is much busier than another; everything else goes to the least-loaded
replica.

The key is the header runtime/serve/ray_proxy.py adds (OpenAI's `user`, or the prompt's first
block); a request without one has no preference. Load is Ray's cached count of requests in
flight per replica (a replica not cached yet counts as idle). The answer is one replica per
rank, best first; Ray's base class takes the first that accepts the request (below its
max_ongoing_requests), and the replica it picks serves that very request (exact matching, not
FIFO). Each router (one per proxy, one per handle) keeps its own key -> replica map (least
recently used keys dropped past MAX_KEYS), so on a cluster with several proxies a conversation
sticks per proxy.
"""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .ray_proxy import AFFINITY_HEADER

MAX_KEYS = 100_000


def request_key(request: PendingRequest | None) -> str | None:
    """The affinity header of an HTTP request routed by Ray's proxy (its first argument is the
    pickled StreamingHTTPRequest carrying the ASGI scope), or None."""
    if request is None or not request.args:
        return None
    arg = request.args[0]
    try:
        scope = pickle.loads(arg).asgi_scope if isinstance(arg, bytes) else getattr(arg, "asgi_scope", None)
    except Exception:  # noqa: BLE001  (not an HTTP request: no preference)
        return None
    if not isinstance(scope, dict):
        return None
    for name, value in scope.get("headers", ()):
        if name == AFFINITY_HEADER:
            return value.decode()
    return None


class ConversationRouter(RequestRouter):
    def initialize_state(self, imbalance: int = 8, **kwargs) -> None:
        """imbalance: the conversation's replica is skipped when it has this many more requests
        in flight than the least-loaded one (KV reuse is not worth a long queue)."""
        self.imbalance = imbalance
        self.homes: OrderedDict[str, ReplicaID] = OrderedDict()

    def _load(self, replica: RunningReplica) -> int:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queued is None else queued

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:  # every replica is in the answer: if none accepts, back off
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        # One replica per rank, in our order: within a rank of several, Ray's base class prefers a
        # replica with a cached queue length over one without, which sends a burst of requests all
        # to the first replica it has heard from.
        ranked = sorted(candidate_replicas, key=lambda r: (self._load(r), random.random()))
        key = request_key(pending_request)
        home = self.homes.get(key) if key is not None else None
        for replica in ranked:
            if replica.replica_id == home:
                if self._load(replica) - self._load(ranked[0]) < self.imbalance:
                    ranked.remove(replica)
                    ranked.insert(0, replica)
                break
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = request_key(pending_request)
        if key is None:
            return
        self.homes[key] = replica_id
        self.homes.move_to_end(key)
        while len(self.homes) > MAX_KEYS:
            self.homes.popitem(last=False)
