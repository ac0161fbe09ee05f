"""``GET /stats/summary/json`` in the shape Acrobits' SIPIS answers it, for the dashboards and
exporters built on it (the community acrobits-sipis-exporter reads ``Instance.Count``,
``Instance.CountInState`` and ``Server.UptimeInSeconds`` / ``Server.MessageLoopQueueSize``).

Every instance is counted in exactly one of Acrobits' states, by its registration status:
``Idle`` (we do not register it: the app does, or it is off), ``Registering`` (an exchange under
way, also a removal), ``Registered``, ``Unauthorized``, ``Error``. ``MessageLoopQueueSize`` is the
work waiting behind the loop that can grow without bound: changes waiting for storage.
"""

from __future__ import annotations

from typing import Any

from contract.kinds import RegStatus
from sipis.operator_api.context import OperatorContext

#: Acrobits' state → our registration statuses counted under it
ACROBITS_STATES: dict[str, tuple[RegStatus, ...]] = {
    "Idle": (RegStatus.IDLE,),
    "Registering": (RegStatus.REGISTERING, RegStatus.UNREGISTERING),
    "Registered": (RegStatus.REGISTERED,),
    "Unauthorized": (RegStatus.UNAUTHORIZED,),
    "Error": (RegStatus.ERROR,),
}


def stats_summary(ctx: OperatorContext) -> dict[str, Any]:
    _, statuses = ctx.state_counts()
    pending = ctx.writer_status().pending if ctx.writer_status is not None else 0
    return {
        "Server": {
            "Name": "sipis-console",
            "VersionString": f"sipis-console {ctx.version}",
            "VersionNumber": ctx.version,
            "Build": ctx.version,
            "UptimeInSeconds": max(0, round(ctx.clock.wall() - ctx.started_at)),
            "MessageLoopQueueSize": pending,
        },
        "Instance": {
            "Count": sum(statuses.values()),
            "CountInState": {name: sum(statuses.get(s.value, 0) for s in members)
                             for name, members in ACROBITS_STATES.items()},
        },
    }
