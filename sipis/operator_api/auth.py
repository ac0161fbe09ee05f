"""Who is asking the operator API: a bearer token (one of ``[[operator.tokens]]``, or a session token
the SSH server minted for one console) or, on the unix socket only, the local administrator named by
the ``X-Operator`` header. Roles are then enforced by the routes and by
:class:`~sipis.operations.Operations`."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable

from sipis.config import OperatorToken
from sipis.operations import ROLE_RANK, Operator
from sipis.operator_api.errors import OperatorApiError

#: The scope key telling the app which listener a request came in on ("unix" or "tcp").
LISTENER_KEY = "sipis.listener"
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_CHALLENGE = 'Bearer realm="sipis-operator"'


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class OperatorSessions:
    """Per-session bearer tokens bound to (name, role), in memory only (a restart ends them)."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Operator] = {}

    def mint(self, name: str, role: str) -> str:
        if role not in ROLE_RANK:
            raise ValueError(f"unknown role {role!r}")
        token = secrets.token_urlsafe(32)
        self._by_hash[token_hash(token)] = Operator(name, role)
        return token

    def revoke(self, token: str) -> bool:
        return self._by_hash.pop(token_hash(token), None) is not None

    def revoke_all(self, name: str) -> int:
        gone = [digest for digest, operator in self._by_hash.items() if operator.name == name]
        for digest in gone:
            del self._by_hash[digest]
        return len(gone)

    def lookup(self, token: str) -> Operator | None:
        return self._by_hash.get(token_hash(token))

    def __len__(self) -> int:
        return len(self._by_hash)


class Authenticator:
    """Configured tokens (both listeners) and session tokens (unix socket only); a wrong token never
    falls back to the local administrator."""

    def __init__(self, tokens: Iterable[OperatorToken], sessions: OperatorSessions) -> None:
        self._tokens = {token_hash(t.token): Operator(t.name, t.role) for t in tokens}
        self._sessions = sessions

    def lookup(self, token: str, listener: str) -> Operator | None:
        operator = self._tokens.get(token_hash(token))
        if operator is None and listener == "unix":
            operator = self._sessions.lookup(token)
        return operator

    def identify(self, authorization: str | None, x_operator: str | None, listener: str) -> Operator:
        """The operator behind a request's headers; 401 when there is none."""
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise OperatorApiError(401, "malformed Authorization header; use Bearer <token>",
                                       headers={"WWW-Authenticate": _CHALLENGE})
            found = self.lookup(token, listener)
            if found is None:
                raise OperatorApiError(401, "token not valid",
                                       headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
            return found
        if listener == "unix":
            name = (x_operator or "local").strip()
            return Operator(name if _OPERATOR_NAME.fullmatch(name) else "local", "admin")
        raise OperatorApiError(401, "Authorization: Bearer <token> required", headers={"WWW-Authenticate": _CHALLENGE})
