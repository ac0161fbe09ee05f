"""What each operator role may do from the console. The console only hides what a role may not do;
the core checks every action again (``docs/operator-api.md``)."""

from __future__ import annotations

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
