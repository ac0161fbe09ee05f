"""What each operator role may do from the console. The console only hides what a role may not do;
the core checks every action again (``docs/operator-api.md``)."""

from __future__ import annotations

from contract.documents import InstanceRow
from contract.kinds import Role

#: instance actions (operator API path names) → (label, role needed)
ACTIONS: dict[str, tuple[str, Role]] = {
    "take-over": ("Take over", Role.OPERATOR),
    "hand-back": ("Hand back", Role.OPERATOR),
    "re-register": ("Re-register", Role.OPERATOR),
    "test-push": ("Test push", Role.OPERATOR),
    "disable": ("Disable", Role.ADMIN),
}
REPLAY_ROLE = Role.OPERATOR
ACKNOWLEDGE_ROLE = Role.OPERATOR


def role_allows(role: str | None, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed`` (unknown roles may only view)."""
    try:
        mine = Role(role or "")
    except ValueError:
        mine = Role.VIEWER
    return mine.allows(Role(needed))


def why_not(action: str, row: InstanceRow | None) -> str | None:
    """Why the core would refuse ``action`` for this instance in its current state (409), or
    ``None``: the console shows such an action disabled with this reason instead of sending it."""
    if row is None or action not in ("take-over", "hand-back", "re-register"):
        return None
    if row.state == "off":
        return "the instance is off (credentials wiped): the app has to enrol again"
    if action == "re-register" and row.state == "active":
        return "the app registers itself (state active): take over first"
    return None
