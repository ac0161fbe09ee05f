"""The lab registrar's digest (``lab.digest_server``): challenges, received credentials and their
verification, round trips with the core's client (``sipis.sip.digest``).

Expected values are computed with hashlib straight from the RFC formulas (``tests.sip.test_digest``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.digest_server import AuthorizationParams, make_challenge, verify_authorization
from sipis.sip.digest import Challenge, DigestError, parse_challenges
from tests.sip.test_digest import SUPPORTED, SUPPORTED_BASES, _counter_session, _hex


@pytest.mark.parametrize(
    "value",
    [
        'Basic realm="r"',
        'Digest realm="r", nonce="n", uri="/", response="00"',  # no username
        'Digest username="u", realm="r", nonce="n", response="00"',  # no uri
        'Digest username="u", realm="r", nonce="n", uri="/", response="00", qop=auth, cnonce="c"',
        'Digest username="u", realm="r", nonce="n", uri="/", response="00", qop=auth, nc=1, cnonce="c"',
        'Digest username="u", realm="r", nonce="n", uri="/", response="00", qop=auth, nc=00000001',
        'Digest username=u, realm=r, nonce=n, uri="/", response="0", qop=auth-conf, nc=00000001, cnonce=c',
        'Digest username="u", realm="r", nonce="n", uri="/", response="00", algorithm=SHA-1',
    ],
)
def test_authorization_parse_rejects(value: str) -> None:
    with pytest.raises(DigestError):
        AuthorizationParams.parse(value)


def test_authorization_parse_nc_value() -> None:
    params = AuthorizationParams.parse(
        'Digest username="u", realm="r", nonce="n", uri="sip:r", response="ab",'
        ' qop=auth, nc=0000001F, cnonce="c", algorithm=md5-sess'
    )
    assert params.nc == "0000001F" and params.nc_value == 31
    assert params.algorithm == "MD5-sess"


_VISIBLE = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=30)


@given(realm=_VISIBLE, username=_VISIBLE, uri=_VISIBLE, nonce=_VISIBLE, opaque=_VISIBLE)
def test_fuzz_round_trip_through_headers(
    realm: str, username: str, uri: str, nonce: str, opaque: str
) -> None:
    challenge = Challenge.parse(make_challenge(realm, "SHA-256", nonce=nonce, opaque=opaque))
    assert (challenge.realm, challenge.nonce, challenge.opaque) == (realm, nonce, opaque)
    params = AuthorizationParams.parse(_counter_session(username, "pw").authorize(challenge, "MESSAGE", uri))
    assert (params.username, params.realm, params.uri) == (username, realm, uri)
    assert verify_authorization(params, "MESSAGE", "pw")




def _qop_cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for algorithm in SUPPORTED:
        qops: list[str | None] = ["auth", "auth-int"]
        if not algorithm.endswith("-sess"):
            qops.append(None)
        cases += [(algorithm, qop) for qop in qops]
    return cases


@pytest.mark.parametrize(("algorithm", "qop"), _qop_cases())
def test_verify_round_trip(algorithm: str, qop: str | None) -> None:
    body = b"hello"
    header_value = make_challenge("lab", algorithm, qop=qop, opaque="op")
    challenge = parse_challenges([header_value])[0]
    session = _counter_session("alice", "right")
    for _ in range(2):  # the nonce reused with nc=2 must verify too
        params = AuthorizationParams.parse(session.authorize(challenge, "REGISTER", "sip:lab", body))
        assert params.algorithm == algorithm and params.qop == qop and params.opaque == "op"
        assert verify_authorization(params, "REGISTER", "right", body)
        assert verify_authorization(params, "REGISTER", "right", body, username="alice")
        assert not verify_authorization(params, "REGISTER", "wrong", body)
        assert not verify_authorization(params, "INVITE", "right", body)
        assert not verify_authorization(params, "REGISTER", "right", body, username="mallory")
        assert verify_authorization(params, "REGISTER", "right", b"other") == (qop != "auth-int")


def test_verify_accepts_upper_case_hex_response() -> None:
    challenge = Challenge.parse(make_challenge("r"))
    params = AuthorizationParams.parse(_counter_session().authorize(challenge, "REGISTER", "sip:r"))
    shouting = AuthorizationParams.parse(
        f'Digest username="{params.username}", realm="r", nonce="{params.nonce}", uri="sip:r",'
        f' response="{params.response.upper()}", qop=auth, nc={params.nc}, cnonce="{params.cnonce}"'
    )
    assert verify_authorization(shouting, "REGISTER", "secret")


@pytest.mark.parametrize("algorithm", SUPPORTED_BASES)
def test_userhash(algorithm: str) -> None:
    challenge = Challenge.parse(make_challenge("r", algorithm, userhash=True))
    assert challenge.userhash
    header = _counter_session("alice", "pw").authorize(challenge, "REGISTER", "sip:r")
    params = AuthorizationParams.parse(header)
    assert params.userhash and "userhash=true" in header
    assert params.username == _hex(algorithm, "alice:r")
    assert verify_authorization(params, "REGISTER", "pw", username="alice")
    assert not verify_authorization(params, "REGISTER", "pw")  # the registrar must name the account
    assert not verify_authorization(params, "REGISTER", "pw", username="bob")
    assert not verify_authorization(params, "REGISTER", "wrong", username="alice")


def test_make_challenge_contents() -> None:
    value = make_challenge("lab", "sha-256", qop="auth,auth-int", opaque="o", stale=True, nonce="N")
    assert value.startswith("Digest ")
    assert Challenge.parse(value) == Challenge(
        realm="lab", nonce="N", algorithm="SHA-256", qop=("auth", "auth-int"), opaque="o", stale=True
    )
    assert Challenge.parse(make_challenge("lab")).nonce != Challenge.parse(make_challenge("lab")).nonce
    assert Challenge.parse(make_challenge("lab", qop=None)).qop == ()


@pytest.mark.parametrize(
    "build",
    [
        lambda: make_challenge("lab", "SHA-1"),
        lambda: make_challenge("lab", qop="auth-conf"),
        lambda: make_challenge("lab", qop=""),
        lambda: make_challenge("a\r\nb"),
        lambda: make_challenge("lab", opaque="\n"),
    ],
    ids=["algorithm", "qop", "empty-qop", "realm-crlf", "opaque-lf"],
)
def test_make_challenge_rejects(build: Callable[[], str]) -> None:
    with pytest.raises(DigestError):
        build()


def test_a_sess_challenge_needs_a_qop() -> None:
    with pytest.raises(DigestError):
        make_challenge("r", "MD5-sess", qop=None)
