"""What the app API needs from the core: the :class:`InstanceService` protocol and its errors.

The HTTP layer only checks syntax and authentication and maps results to status codes; every
decision about instances (selectors, tokens, state changes, persistence) is the service's.
"""

from __future__ import annotations

from typing import Protocol

from contract.documents import HeldCall
from sipis.api.models import EnrollIn, PushIn
from sipis.instance import Instance


class ServiceError(Exception):
    """The service refused a well-formed request. ``detail`` is shown to the app: no secrets."""

    status_code = 409
    code = "conflict"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InstanceGone(ServiceError):
    """The instance disappeared between authentication and the operation (e.g. a racing DELETE)."""

    status_code = 404
    code = "not_found"


class SelectorTaken(ServiceError):
    """Enrolment named a selector that exists, without that instance's own token."""

    code = "selector_taken"


class InstanceService(Protocol):
    def check_enroll_token(self, token: str) -> bool:
        """True if ``token`` is a valid enrolment token (constant-time comparison inside)."""
        ...

    def check_instance_token(self, selector: str, token: str) -> bool:
        """True if ``token`` is the current bearer token of ``selector``; False for unknown
        selectors. Constant-time comparison inside."""
        ...

    async def enroll(self, request: EnrollIn, *, by_owner: bool = False) -> tuple[Instance, str]:
        """Create an instance, or update the one named by ``request.selector``.

        Returns the instance and a freshly issued bearer token. Only the instance's owner (the
        caller proved it holds that instance's token: ``by_owner``) may update it; otherwise an
        existing selector raises :class:`SelectorTaken`. On update the previous token is invalidated.
        """
        ...

    def get(self, selector: str) -> Instance | None: ...

    async def set_state(self, selector: str, state: str, contact: str | None) -> Instance:
        """Apply ``active``/``inactive``; may raise :class:`ServiceError`."""
        ...

    async def update_push(self, selector: str, push: PushIn) -> Instance: ...

    async def delete(self, selector: str) -> None:
        """Remove the instance (the core unregisters its binding first)."""
        ...

    async def call_progress(self, selector: str, push_id: str) -> HeldCall:
        """The app woke up for the held call ``push_id``; returns the call's view.
        Raises :class:`InstanceGone` when there is no such held call for this instance."""
        ...
