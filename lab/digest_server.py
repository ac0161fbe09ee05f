"""Server-side SIP Digest for the lab registrar: challenges, received credentials, verification.

The core is only ever a digest client (``sipis.sip.digest``); a registrar that challenges it lives
in the lab (``lab.pbx``) and in tests. Both sides share the client module's RFC 7616 vocabulary
(parameter parsing, algorithm names, quoting) and its one computation of ``response``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

from sipis.sip.digest import (
    QOPS,
    DigestError,
    checked_algorithm,
    digest_response,
    flag_param,
    normalise_algorithm,
    parse_digest,
    qop_tokens,
    quote,
    required_param,
    supported_algorithms,
    userhash,
)

_NC = re.compile(r"[0-9A-Fa-f]{8}")


def make_challenge(
    realm: str,
    algorithm: str = "MD5",
    *,
    qop: str | None = "auth",
    opaque: str | None = None,
    stale: bool = False,
    nonce: str | None = None,
    userhash: bool = False,
) -> str:
    """A ``WWW-Authenticate``/``Proxy-Authenticate`` value; ``qop`` like ``"auth,auth-int"``."""
    algorithm = checked_algorithm(normalise_algorithm(algorithm))
    qops = qop_tokens(qop or "")
    if any(token not in QOPS for token in qops) or (qop is not None and not qops):
        raise DigestError(f"unsupported qop {qop!r}")
    if algorithm.endswith("-sess") and not qops:
        raise DigestError(f"{algorithm} needs a qop")
    parts = [
        f"realm={quote(realm)}",
        f"nonce={quote(nonce or secrets.token_urlsafe(24))}",
        f"algorithm={algorithm}",
    ]
    if qops:
        parts.append(f'qop="{",".join(qops)}"')
    if opaque is not None:
        parts.append(f"opaque={quote(opaque)}")
    if stale:
        parts.append("stale=true")
    if userhash:
        parts.append("userhash=true")
    return "Digest " + ", ".join(parts)


@dataclass(frozen=True)
class AuthorizationParams:
    """The parameters of a received ``Authorization``/``Proxy-Authorization`` value.

    ``nc`` stays the 8-hex-digit string as sent (it is hashed verbatim); see :attr:`nc_value`.
    With ``userhash`` the ``username`` is the hash, not the account name.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    userhash: bool = False

    @property
    def nc_value(self) -> int | None:
        """The nonce count as a number, for replay checks."""
        return int(self.nc, 16) if self.nc is not None else None

    @classmethod
    def parse(cls, header_value: str) -> AuthorizationParams:
        """Parse one Digest credentials value; :class:`DigestError` if malformed or unsupported."""
        params = parse_digest(header_value)
        qop = params.get("qop")
        if qop is not None:
            qop = qop.strip().lower()
            if qop not in QOPS:
                raise DigestError(f"unsupported qop {qop!r}")
            if not _NC.fullmatch(required_param(params, "nc")):
                raise DigestError("nc must be 8 hex digits")
            required_param(params, "cnonce")
        return cls(
            username=required_param(params, "username"),
            realm=required_param(params, "realm"),
            nonce=required_param(params, "nonce"),
            uri=required_param(params, "uri"),
            response=required_param(params, "response"),
            algorithm=checked_algorithm(normalise_algorithm(params.get("algorithm") or "MD5")),
            qop=qop,
            nc=params.get("nc") if qop else None,
            cnonce=params.get("cnonce") if qop else None,
            opaque=params.get("opaque"),
            userhash=flag_param(params, "userhash"),
        )


def verify_authorization(
    params: AuthorizationParams,
    method: str,
    password: str,
    body: bytes = b"",
    *,
    username: str | None = None,
) -> bool:
    """Whether ``params.response`` is right for this password (constant-time comparison).

    ``username`` is the account name the registrar expects; it is required when the client
    used ``userhash``. Nonce freshness, realm and ``nc`` replay checks are the caller's job.
    """
    if params.algorithm not in supported_algorithms() or (params.qop is not None and params.qop not in QOPS):
        return False
    account = _account_name(params, username)
    if account is None:
        return False
    try:
        expected = digest_response(params.algorithm, account, params.realm, password, params.nonce, method,
                                   params.uri, qop=params.qop, nc=params.nc, cnonce=params.cnonce, body=body)
    except DigestError:  # e.g. -sess or qop without cnonce: cannot be right
        return False
    return hmac.compare_digest(expected.encode(), params.response.lower().encode("utf-8"))


def _account_name(params: AuthorizationParams, expected: str | None) -> str | None:
    """The plain account name the response was computed with, or None on a mismatch."""
    if not params.userhash:
        return params.username if expected in (None, params.username) else None
    if expected is None:
        return None
    hashed = userhash(params.algorithm, expected, params.realm)
    return expected if hmac.compare_digest(hashed.encode(), params.username.lower().encode("utf-8")) else None
