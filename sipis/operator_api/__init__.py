"""The operator API: what the console (one process per operator) and automation use to see and steer
the core. The contract is ``docs/operator-api.md``; its documents are the ``contract`` package's.

One job per module:

* :mod:`~sipis.operator_api.auth` — who asks: bearer tokens, session tokens
  (:class:`OperatorSessions`, minted by the SSH server), the unix socket's local administrator;
* read models kept from the bus: :mod:`~sipis.operator_api.ring` (:class:`EventRing`, the last
  events), :mod:`~sipis.operator_api.index` (:class:`InstanceIndex`, the instance list's keys,
  orders and counts), :mod:`~sipis.operator_api.health` (PBX reachability, push statistics);
* :mod:`~sipis.operator_api.context` — :class:`OperatorContext`, what the API reads and calls;
* :mod:`~sipis.operator_api.queries` — the reads as contract documents, memory merged with storage;
* :mod:`~sipis.operator_api.pages` (the instance list, JSON or NDJSON),
  :mod:`~sipis.operator_api.stream` (the event stream), :mod:`~sipis.operator_api.responses` and
  :mod:`~sipis.operator_api.errors` — encoding answers;
* :mod:`~sipis.operator_api.routes` — :func:`create_operator_app`, the thin routes;
* :mod:`~sipis.operator_api.server` — :class:`OperatorServer`, uvicorn in the core's loop.
"""

from sipis.operator_api.auth import OperatorSessions
from sipis.operator_api.context import OperatorContext
from sipis.operator_api.index import DYNAMIC_SORTS, InstanceIndex
from sipis.operator_api.ring import EventRing
from sipis.operator_api.routes import create_operator_app
from sipis.operator_api.server import OperatorServer, is_loopback, listener_app

__all__ = [
    "DYNAMIC_SORTS",
    "EventRing",
    "InstanceIndex",
    "OperatorContext",
    "OperatorServer",
    "OperatorSessions",
    "create_operator_app",
    "is_loopback",
    "listener_app",
]
