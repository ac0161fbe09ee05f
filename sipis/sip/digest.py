"""SIP Digest authentication, client side (RFC 2617, RFC 7616, RFC 8760 for SIP; RFC 2069 legacy mode).

:func:`parse_challenges` reads ``WWW-Authenticate`` (401) / ``Proxy-Authenticate`` (407) values,
:func:`choose_challenge` picks the strongest usable one and :meth:`DigestSession.authorize` answers
it, counting ``nc`` per reused nonce. What a server side needs as well (the lab registrar,
``lab.digest_server``) is public here so both sides speak the same RFC: :func:`parse_digest` and
its parameter readers, :func:`normalise_algorithm`, :func:`checked_algorithm`, :func:`qop_tokens`,
:func:`quote`, :func:`userhash` and :func:`digest_response`, the one computation of ``response``.

Algorithms: MD5, SHA-256 and SHA-512-256, each with its ``-sess`` variant, as far as
:mod:`hashlib` provides them. Strings are hashed as UTF-8. Passwords never appear in reprs,
exceptions or logs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sipis.sip.message import random_hex

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

__all__ = [
    "QOPS",
    "Challenge",
    "Credentials",
    "DigestError",
    "DigestSession",
    "checked_algorithm",
    "choose_challenge",
    "choose_per_realm",
    "digest_response",
    "flag_param",
    "header_names",
    "normalise_algorithm",
    "parse_challenges",
    "parse_digest",
    "qop_tokens",
    "quote",
    "required_param",
    "supported_algorithms",
    "userhash",
]


class DigestError(ValueError):
    """A Digest header is unparsable, or asks for something this module does not support."""


# --------------------------------------------------------------------------- algorithms

#: RFC 7616 §6.1 algorithm tokens -> hashlib names, strongest first (RFC 8760 §2.1 preference).
_HASHLIB_NAMES: dict[str, str] = {"SHA-512-256": "sha512_256", "SHA-256": "sha256", "MD5": "md5"}
_SESS = "-sess"
#: the qop values we compute, cheapest first
QOPS = ("auth", "auth-int")


def _hash_available(hashlib_name: str) -> bool:
    # OpenSSL builds differ (sha512_256 may be missing, MD5 may be blocked by FIPS policy).
    try:
        hashlib.new(hashlib_name, b"", usedforsecurity=False)
    except ValueError:
        return False
    return True


_SUPPORTED: tuple[str, ...] = tuple(
    name
    for base, hashlib_name in _HASHLIB_NAMES.items()
    if _hash_available(hashlib_name)
    for name in (base, base + _SESS)
)
#: Higher is stronger; a ``-sess`` variant ranks with its base algorithm.
_STRENGTH: dict[str, int] = {base: len(_HASHLIB_NAMES) - i for i, base in enumerate(_HASHLIB_NAMES)}


def supported_algorithms() -> tuple[str, ...]:
    """The algorithm tokens this interpreter can compute, strongest first."""
    return _SUPPORTED


def normalise_algorithm(value: str) -> str:
    """Upper-case the token but keep the conventional lower-case ``-sess`` suffix."""
    upper = value.strip().upper()
    if upper.endswith(_SESS.upper()):
        return upper[: -len(_SESS)] + _SESS
    return upper


def _split_algorithm(algorithm: str) -> tuple[str, bool]:
    """``"SHA-256-sess"`` -> ``("SHA-256", True)``."""
    if algorithm.endswith(_SESS):
        return algorithm[: -len(_SESS)], True
    return algorithm, False


def checked_algorithm(algorithm: str) -> str:
    """``algorithm`` (normalised) if this interpreter can compute it; DigestError otherwise."""
    if algorithm not in _SUPPORTED:
        raise DigestError(f"unsupported digest algorithm {algorithm!r}")
    return algorithm


def _hasher(hashlib_name: str) -> Callable[[bytes], Hash]:
    """hashlib's own constructor for this name where there is one (``hashlib.new`` looks the name
    up on every call), else ``hashlib.new``; never for security (MD5 under FIPS policies)."""
    constructor = getattr(hashlib, hashlib_name, None)
    if constructor is not None:
        try:
            constructor(b"", usedforsecurity=False)
        except (TypeError, ValueError):
            constructor = None
    if constructor is not None:
        return functools.partial(constructor, usedforsecurity=False)
    return functools.partial(hashlib.new, hashlib_name, usedforsecurity=False)


#: base algorithm token -> bytes -> hash object
_HASHERS: dict[str, Callable[[bytes], Hash]] = {
    base: _hasher(name) for base, name in _HASHLIB_NAMES.items() if _hash_available(name)
}


# --------------------------------------------------------------------------- header syntax

# RFC 7230 §3.2.6 token, quoted-string; RFC 7235 §2.1 token68. Whitespace includes CR/LF so that
# folded values (as printed in the RFCs) parse; values themselves may not contain controls.
_OWS = re.compile(r"[ \t\r\n]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t\r\n]*(?:,|\Z))")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_BARE_VALUE = re.compile(r'[^ \t\r\n,"]+')  # lenient: servers send e.g. domain=sip:x unquoted
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _Scanner:
    """A cursor over one header value."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def take(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        match = pattern.match(self.text, self.pos)
        if match is not None:
            self.pos = match.end()
        return match

    def skip_ws(self) -> None:
        self.take(_OWS)

    def skip_separators(self) -> None:
        # The #rule allows empty list elements: ", ,a=b" is legal.
        self.skip_ws()
        while self.peek() == ",":
            self.pos += 1
            self.skip_ws()


def _read_value(scanner: _Scanner) -> str:
    quoted = scanner.take(_QUOTED)
    if quoted is not None:
        value = _QUOTED_PAIR.sub(r"\1", quoted.group(1))
    elif scanner.peek() == '"':
        raise DigestError("unterminated quoted string")
    else:
        bare = scanner.take(_BARE_VALUE)
        value = bare.group() if bare is not None else ""
    # Values are echoed into our own requests: a CR/LF would be header injection.
    if _CONTROL.search(value):
        raise DigestError("control character in a parameter value")
    return value


def _read_params(scanner: _Scanner) -> dict[str, str]:
    """The auth-params after a scheme, up to the end or the start of the next challenge."""
    params: dict[str, str] = {}
    scanner.skip_ws()
    if scanner.take(_TOKEN68) is not None:  # e.g. Basic credentials: no params
        return params
    while True:
        scanner.skip_separators()
        start = scanner.pos
        name = scanner.take(_TOKEN)
        if name is None:
            if scanner.done():
                return params
            raise DigestError("expected a parameter name")
        scanner.skip_ws()
        if scanner.peek() != "=":
            scanner.pos = start  # a token without "=" is the next challenge's scheme
            return params
        scanner.pos += 1
        scanner.skip_ws()
        key = name.group().lower()
        if key in params:
            # Ambiguous (which one would the server check?), so refuse rather than guess.
            raise DigestError(f"duplicate parameter {key!r}")
        params[key] = _read_value(scanner)


def _split_challenges(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split one header value into ``(scheme, params)`` pairs (RFC 7235 allows several)."""
    scanner = _Scanner(text)
    found: list[tuple[str, dict[str, str]]] = []
    scanner.skip_separators()
    while not scanner.done():
        scheme = scanner.take(_TOKEN)
        if scheme is None:
            raise DigestError("expected an authentication scheme")
        found.append((scheme.group(), _read_params(scanner)))
        scanner.skip_separators()
    if not found:
        raise DigestError("empty authentication header")
    return found


def parse_digest(text: str) -> dict[str, str]:
    """The parameters (names lower-cased) of a header value that must hold exactly one Digest
    challenge or credentials; DigestError otherwise."""
    parts = _split_challenges(text)
    if len(parts) != 1:
        raise DigestError(f"expected one Digest value, found {len(parts)} schemes")
    scheme, params = parts[0]
    if scheme.lower() != "digest":
        raise DigestError(f"not a Digest value (scheme {scheme!r})")
    return params


def required_param(params: dict[str, str], name: str) -> str:
    """The parameter ``name``; DigestError when it is missing or empty."""
    value = params.get(name)
    if not value:
        raise DigestError(f"missing or empty {name!r}")
    return value


def flag_param(params: dict[str, str], name: str) -> bool:
    """Whether the parameter ``name`` says ``true``."""
    return params.get(name, "").strip().lower() == "true"


def _plain(value: str) -> bool:
    """Whether ``value`` needs no more than quotes around it: printable ASCII, no quote, no
    backslash (so a run of values joined together is plain when each of them is)."""
    return value.isascii() and value.isprintable() and '"' not in value and "\\" not in value


def quote(value: str) -> str:
    """``value`` as a quoted string; DigestError for control characters (header injection)."""
    if _plain(value):
        return f'"{value}"'  # the usual value: nothing to check further or to escape
    if _CONTROL.search(value):
        raise DigestError("control character in a value to send")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def qop_tokens(value: str) -> tuple[str, ...]:
    """The qop list of a parameter value, lower-cased."""
    return tuple(token for part in value.split(",") if (token := part.strip().lower()))


# --------------------------------------------------------------------------- challenges


@dataclass(frozen=True, slots=True)
class Challenge:
    """One Digest challenge from a ``WWW-Authenticate`` or ``Proxy-Authenticate`` value."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    userhash: bool = False
    domain: str | None = None
    scheme: str = "Digest"

    @classmethod
    def parse(cls, header_value: str) -> Challenge:
        """Parse one challenge; :class:`DigestError` if unparsable or not answerable by us."""
        return cls._from_params(parse_digest(header_value))

    @classmethod
    def _from_params(cls, params: dict[str, str]) -> Challenge:
        challenge = cls(
            realm=required_param(params, "realm"),
            nonce=required_param(params, "nonce"),
            algorithm=normalise_algorithm(params.get("algorithm") or "MD5"),
            qop=qop_tokens(params.get("qop", "")),
            opaque=params.get("opaque"),
            stale=flag_param(params, "stale"),
            userhash=flag_param(params, "userhash"),
            domain=params.get("domain"),
        )
        _check_answerable(challenge)
        return challenge


def _check_answerable(challenge: Challenge) -> None:
    if challenge.scheme.lower() != "digest":
        raise DigestError(f"not a Digest challenge (scheme {challenge.scheme!r})")
    checked_algorithm(challenge.algorithm)
    _pick_qop(challenge.qop)
    # A -sess key needs a cnonce, and RFC 2617 only lets the client send one with qop.
    if _split_algorithm(challenge.algorithm)[1] and not challenge.qop:
        raise DigestError(f"{challenge.algorithm} challenge without qop")


#: (scheme, algorithm, qop offered) -> the qop to answer with, for challenges found answerable
_ANSWERABLE: dict[tuple[str, str, tuple[str, ...]], str | None] = {}


def _answerable_qop(challenge: Challenge) -> str | None:
    """``_check_answerable(challenge)`` then ``_pick_qop(challenge.qop)``, remembered per (scheme,
    algorithm, qop offered), which is all either looks at."""
    key = (challenge.scheme, challenge.algorithm, challenge.qop)
    try:
        return _ANSWERABLE[key]
    except KeyError:
        pass
    _check_answerable(challenge)  # raises for what cannot be answered (not remembered)
    qop = _pick_qop(challenge.qop)
    if len(_ANSWERABLE) < 256:  # servers send a handful of kinds; a flood of odd ones is not kept
        _ANSWERABLE[key] = qop
    return qop


def _is_answerable(challenge: Challenge) -> bool:
    try:
        _check_answerable(challenge)
    except DigestError:
        return False
    return True


def _pick_qop(offered: tuple[str, ...]) -> str | None:
    """``auth`` when offered (cheapest, no body hash), else ``auth-int``; None for RFC 2069."""
    if not offered:
        return None
    for qop in QOPS:
        if qop in offered:
            return qop
    raise DigestError(f"unsupported qop options {offered!r}")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Every answerable Digest challenge in these header values, in order; never raises.

    Other schemes, unparsable values and unsupported algorithms/qops are skipped.
    """
    if isinstance(values, str):  # a lone value would otherwise iterate per character
        values = [values]
    challenges: list[Challenge] = []
    for value in values:
        try:
            parts = _split_challenges(value)
        except DigestError:
            continue
        for scheme, params in parts:
            if scheme.lower() != "digest":
                continue
            try:
                challenges.append(Challenge._from_params(params))
            except DigestError:
                continue
    return challenges


def _strength(challenge: Challenge) -> int:
    return _STRENGTH[_split_algorithm(challenge.algorithm)[0]]


def choose_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The strongest answerable challenge; on a tie the topmost (RFC 8760 §2.4 server order)."""
    best: Challenge | None = None
    for challenge in challenges:
        if _is_answerable(challenge) and (best is None or _strength(challenge) > _strength(best)):
            best = challenge
    return best


def choose_per_realm(challenges: Iterable[Challenge]) -> list[Challenge]:
    """The strongest answerable challenge of each realm, in first-seen realm order.

    A forked request may be challenged by several proxies (RFC 3261 §22.3); each realm gets
    its own credentials header.
    """
    by_realm: dict[str, list[Challenge]] = {}
    for challenge in challenges:
        by_realm.setdefault(challenge.realm, []).append(challenge)
    chosen = (choose_challenge(group) for group in by_realm.values())
    return [challenge for challenge in chosen if challenge is not None]


def header_names(status: int) -> tuple[str, str]:
    """(challenge header, credentials header) for a 401 or 407 response."""
    if status == 401:
        return "WWW-Authenticate", "Authorization"
    if status == 407:
        return "Proxy-Authenticate", "Proxy-Authorization"
    raise ValueError(f"status {status} carries no Digest challenge")


# --------------------------------------------------------------------------- computation


def digest_response(algorithm: str, username: str, realm: str, password: str, nonce: str, method: str,
                    uri: str, *, qop: str | None = None, nc: str | None = None, cnonce: str | None = None,
                    body: bytes = b"") -> str:
    """The ``response`` value of RFC 7616 §3.4.1 (RFC 2617 §3.2.2, RFC 2069 without ``qop``).

    ``algorithm`` is a supported token (:func:`checked_algorithm`); ``nc`` is the 8-hex-digit
    string as sent. DigestError when the inputs cannot make a response (a ``-sess`` algorithm
    without ``cnonce``, ``qop`` without ``nc`` and ``cnonce``).
    """
    base, sess = _split_algorithm(algorithm)
    hasher = _HASHERS[base]
    ha1 = hasher(f"{username}:{realm}:{password}".encode()).hexdigest()
    if sess:
        if cnonce is None:
            raise DigestError("a -sess algorithm needs a cnonce")
        ha1 = hasher(f"{ha1}:{nonce}:{cnonce}".encode()).hexdigest()
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + hasher(body).hexdigest()
    ha2 = hasher(a2.encode()).hexdigest()
    if qop is None:  # RFC 2069 compatibility
        return hasher(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    if nc is None or cnonce is None:
        raise DigestError("qop needs nc and cnonce")
    return hasher(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode()).hexdigest()


def userhash(algorithm: str, username: str, realm: str) -> str:
    """RFC 7616 §3.4.4: the username as sent when the server asked for userhash."""
    return _HASHERS[_split_algorithm(algorithm)[0]](f"{username}:{realm}".encode()).hexdigest()


# --------------------------------------------------------------------------- client


@dataclass
class Credentials:
    """A SIP account's digest credentials; ``repr`` leaves the password out."""

    username: str
    password: str = field(repr=False)


@dataclass(slots=True)
class _NonceState:
    """How often the current nonce of one realm has been used."""

    nonce: str
    count: int = 0
    cnonce: str | None = None  # kept for -sess, whose session key binds the first cnonce


_MAX_NC = 0xFFFFFFFF


def _default_cnonce() -> str:
    return random_hex(16)


class DigestSession:
    """Answers challenges for one account, keeping per-realm nonce counts.

    Reusing a nonce increments ``nc``; a challenge with a new nonce (``stale=true`` or not)
    starts again at 1. A stale challenge is never a failure: whether a re-challenge means the
    password was refused is answered by :meth:`credentials_rejected`.

    Credentials in advance (:meth:`reuse`): once a request that answered a challenge has been
    accepted, the next request (a REGISTER refresh) may carry an answer to the same challenge
    with the next ``nc`` before being challenged at all (RFC 7616 §3.4: ``nc`` counts the
    requests sent with one nonce), which spares it the 401 round trip for as long as the server
    takes the nonce. A server that
    does not (its nonce expired: ``stale=true``; one-time nonces) challenges it: the caller
    answers that challenge as usual and calls :meth:`reuse_refused`, and the session stops
    offering nonces as old as the refused one was.
    """

    __slots__ = ("_cnonce_factory", "_credentials", "_reusable", "_reuse_max_age", "_states")

    def __init__(self, credentials: Credentials, *, cnonce_factory: Callable[[], str] | None = None) -> None:
        self._credentials = credentials
        self._cnonce_factory = cnonce_factory or _default_cnonce
        self._states: dict[str, _NonceState] = {}
        #: (challenge, credentials header, when its nonce was first answered, where it was
        #: accepted) of the last challenge whose answer was accepted
        self._reusable: tuple[Challenge, str, float, object] | None = None
        #: nonces at least this old (seconds) are not offered again; learnt from refusals
        self._reuse_max_age: float | None = None

    def reuse(self, method: str, uri: str, now: float, scope: object = None) -> tuple[str, str] | None:
        """``(header, value)`` answering the last accepted challenge again (next ``nc``), for a
        request nobody has challenged yet; None when there is none, when it was accepted for
        another ``scope`` (the caller's notion of "the same server", compared by equality) or when
        its nonce is probably too old by what refusals taught. ``now`` is a monotonic time, as
        given to :meth:`accepted`."""
        reusable = self._reusable
        if reusable is None:
            return None
        challenge, header, since, accepted_scope = reusable
        if accepted_scope != scope:
            return None
        if self._reuse_max_age is not None and now - since >= self._reuse_max_age:
            return None
        state = self._states.get(challenge.realm)
        if state is None or state.nonce != challenge.nonce or state.count >= _MAX_NC:
            return None  # another nonce answered since, or nc exhausted
        return header, self.authorize(challenge, method, uri)

    def accepted(self, challenge: Challenge, header: str, since: float, scope: object = None) -> None:
        """A request carrying our answer to ``challenge`` (in ``header``) was accepted by
        ``scope``; its nonce was first answered at ``since``: offer it again by :meth:`reuse`."""
        self._reusable = (challenge, header, since, scope)

    def reuse_refused(self, now: float) -> None:
        """The request with the credentials :meth:`reuse` gave was challenged: offer no nonce that
        old again (a margin below it, as refresh times vary), and not this one at all."""
        reusable = self._reusable
        if reusable is None:
            return
        age = max(0.0, now - reusable[2]) * 0.75
        if self._reuse_max_age is None or age < self._reuse_max_age:
            self._reuse_max_age = age
        self._reusable = None

    def forget_reuse(self) -> None:
        """Offer nothing by :meth:`reuse` until the next accepted answer (e.g. after a 403)."""
        self._reusable = None

    def __repr__(self) -> str:
        return f"DigestSession(username={self._credentials.username!r}, realms={sorted(self._states)!r})"

    def authorize(self, challenge: Challenge, method: str, uri: str, body: bytes = b"") -> str:
        """The ``Authorization``/``Proxy-Authorization`` value answering ``challenge``."""
        qop = _answerable_qop(challenge)
        state = self._use_nonce(challenge)
        algorithm, realm, nonce = challenge.algorithm, challenge.realm, challenge.nonce
        credentials = self._credentials
        nc = cnonce = None
        if qop is not None:  # else RFC 2069 compatibility: no nc, no cnonce (and never -sess)
            nc = f"{state.count:08x}"
            cnonce = self._cnonce(state, _split_algorithm(algorithm)[1])
        response = digest_response(algorithm, credentials.username, realm, credentials.password, nonce,
                                   method, uri, qop=qop, nc=nc, cnonce=cnonce, body=body)
        username = credentials.username
        if challenge.userhash:
            username = userhash(algorithm, username, realm)
        # RFC 7616 §3.4: algorithm, qop and nc are never quoted. Values that need no escaping (as
        # good as all) are quoted here at once instead of by quote() one by one, which cost 0.9 %
        # of a registration's instructions (register_rate under callgrind, UDP: 3.8k of 415k).
        if _plain(username + realm + nonce + uri + (cnonce or "")):
            value = (f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                     f'response="{response}", algorithm={algorithm}')
            if qop is not None:
                value += f', qop={qop}, nc={nc}, cnonce="{cnonce}"'
        else:
            value = (f"Digest username={quote(username)}, realm={quote(realm)}, nonce={quote(nonce)}, "
                     f'uri={quote(uri)}, response="{response}", algorithm={algorithm}')
            if qop is not None:
                value += f", qop={qop}, nc={nc}, cnonce={quote(cnonce or '')}"
        if challenge.opaque is not None:
            value += f", opaque={quote(challenge.opaque)}"
        if challenge.userhash:
            value += ", userhash=true"
        return value

    def credentials_rejected(self, challenge: Challenge) -> bool:
        """Whether a re-challenge of a request that carried our credentials means "wrong password".

        Not when the server says ``stale=true``, nor when we had reused an older nonce (the
        server may just not accept reuse): only a fresh nonce answered once and challenged again.
        """
        if challenge.stale:
            return False
        state = self._states.get(challenge.realm)
        return state is not None and state.count == 1

    def _use_nonce(self, challenge: Challenge) -> _NonceState:
        state = self._states.get(challenge.realm)
        if state is None or state.nonce != challenge.nonce:
            state = _NonceState(challenge.nonce)
            self._states[challenge.realm] = state
        if state.count >= _MAX_NC:
            raise DigestError("nonce count exhausted; a new challenge is needed")
        state.count += 1
        return state

    def _cnonce(self, state: _NonceState, sess: bool) -> str:
        if not sess:
            return self._cnonce_factory()
        if state.cnonce is None:
            state.cnonce = self._cnonce_factory()
        return state.cnonce
