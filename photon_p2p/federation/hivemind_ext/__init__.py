"""photon_p2p's hivemind adapter: the only place that subclasses or patches hivemind's averaging/optim internals."""

# Files mirror hivemind's own: averager.py (hivemind/averaging/averager.py), allreduce.py, partition.py,
# matchmaking.py (hivemind/averaging/...), progress_tracker.py (hivemind/optim/progress_tracker.py), validation.py
# (hivemind/dht/validation.py), dht_stats.py (hivemind/dht/protocol.py), serialization.py
# (hivemind/compression/serialization.py), dht.py (hivemind/dht/dht.py). They
# override private coroutines of one hivemind version, checked below before any of them is used (importing a
# submodule runs this file first); nothing else in photon_p2p touches hivemind's averaging/optim internals.
# - ``ExactAllReduceRunner`` (allreduce.py): hivemind's butterfly all-reduce returns each member
#   ``own + compress(avg − own)``, so members end on different bytes (always with a lossy codec, by rounding even
#   without one). Our reducers compress each averaged part ONCE and send every member those same bytes; members
#   (the reducer included) adopt the decoded average as is. After a successful round every member holds
#   bit-identical tensors.
# - ``OrderedPartReducer`` (partition.py): a reducer sums its senders' parts in a canonical order (the "rank" each
#   member gathers), not in arrival order, so two groups given the same inputs compute the same bytes (groups.py).
# - Admission (closed swarms, federation/admission.py): ``AdmissionGate`` (averager.py) holds the admitted set in
#   the averager process; join requests, all-reduce parts and state downloads from peers outside it are refused,
#   and this peer neither follows a leader outside it (``AdmittedMatchmaking``), downloads state from one, nor
#   averages in a group with one.
# - Matchmaking (``AdmittedMatchmaking``, matchmaking.py): no ghost members, i.e. a leader never counts a follower
#   that walked away (late "accepted", late "begin").
# - Healing (``ProcessAverager``, averager.py): when a group's gathered fingerprints differ, the members hold
#   different global models; that round the averager turns Δ = θ_global − θ_local into θ_local in place and
#   averages weights losslessly, so the group leaves the round on one model.
# - ``RoundTracker`` (progress_tracker.py): hivemind's ProgressTracker, which also reports who is at which round.
# - ``count_registry_traffic`` (serialization.py): wraps the codecs of hivemind's module-level registry, through
#   which a reducer's returned parts and everything received are (de)serialized, so their bytes are counted.
# - ``CachedValidator`` (validation.py): hivemind's CompositeValidator that remembers the records it has passed, so
#   a record is not re-verified (RSA signature, schema) on every DHT answer that carries it.
# - ``dht_stats`` (dht_stats.py): wraps DHTProtocol's rpc_ping / rpc_store / rpc_find to count the requests and
#   bytes this peer's DHT node serves (bench/scale.py's cost per peer as the swarm grows).
# - ``dht.install`` (dht.py): DHT._run_coroutine drops the result of a call its caller stopped waiting for, as
#   hivemind's get/store do, instead of logging two tracebacks.

import hivemind

from photon_p2p.federation import FederationError

PINNED_HIVEMIND = "1.1.12"
if hivemind.__version__ != PINNED_HIVEMIND:
    # The subclasses in this package override private coroutines of hivemind's averager and all-reduce runner.
    raise FederationError(f"photon_p2p needs hivemind=={PINNED_HIVEMIND} (found {hivemind.__version__}); "
                          f"pip install hivemind=={PINNED_HIVEMIND}")
