"""Digest authentication, client side: published RFC vectors, independent -sess formulas, parsing,
state. The lab's server side (``lab.digest_server``) reads the credentials we write; its own tests
are in ``tests/lab/test_digest_server.py``.

Expected response values are either copied from the RFCs or computed here straight from the
RFC 2617 / RFC 7616 formulas with hashlib, never with the module under test.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.digest_server import AuthorizationParams, make_challenge, verify_authorization
from sipis.sip.digest import (
    Challenge,
    Credentials,
    DigestError,
    DigestSession,
    choose_challenge,
    choose_per_realm,
    header_names,
    parse_challenges,
    supported_algorithms,
)

HASHLIB_NAMES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
SUPPORTED = supported_algorithms()
SUPPORTED_BASES = [alg for alg in SUPPORTED if not alg.endswith("-sess")]
SUPPORTED_SESS = [alg for alg in SUPPORTED if alg.endswith("-sess")]


def _hex(algorithm: str, data: str | bytes) -> str:
    """H() of RFC 7616 §3.4.1, written independently of the module."""
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.new(HASHLIB_NAMES[algorithm.removesuffix("-sess")], raw).hexdigest()


def _session(username: str, password: str, cnonce: str = "0a4f113b") -> DigestSession:
    return DigestSession(Credentials(username, password), cnonce_factory=lambda: cnonce)


def _counter_session(username: str = "alice", password: str = "secret") -> DigestSession:
    count = iter(range(1, 1_000_000))
    return DigestSession(Credentials(username, password), cnonce_factory=lambda: f"cn{next(count)}")


# --------------------------------------------------------------------------- published vectors

RFC2617_CHALLENGE = (
    'Digest realm="testrealm@host.com", qop="auth,auth-int", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)


def test_rfc2617_section_3_5_example() -> None:
    challenge = Challenge.parse(RFC2617_CHALLENGE)
    header = _session("Mufasa", "Circle Of Life").authorize(challenge, "GET", "/dir/index.html")
    params = AuthorizationParams.parse(header)
    assert params.response == "6629fae49393a05397450978507c4ef1"
    assert (params.username, params.realm, params.uri) == ("Mufasa", "testrealm@host.com", "/dir/index.html")
    assert (params.qop, params.nc, params.cnonce) == ("auth", "00000001", "0a4f113b")
    assert params.opaque == "5ccc069c403ebaf9f0171e9517f40e41"
    assert "qop=auth," in header and "nc=00000001," in header  # unquoted, as RFC 7616 demands


# RFC 7616 §3.9.1, as printed (folded over several lines).
RFC7616_CHALLENGE = """Digest
       realm="http-auth@example.org",
       qop="auth, auth-int",
       algorithm={algorithm},
       nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
       opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\""""


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_section_3_9_1_examples(algorithm: str, expected: str) -> None:
    challenge = Challenge.parse(RFC7616_CHALLENGE.format(algorithm=algorithm))
    session = _session("Mufasa", "Circle of Life", cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
    params = AuthorizationParams.parse(session.authorize(challenge, "GET", "/dir/index.html"))
    assert params.response == expected
    assert params.algorithm == algorithm
    assert params.nc == "00000001"
    assert params.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


# --------------------------------------------------------------------------- independent formulas


@pytest.mark.parametrize("algorithm", SUPPORTED_SESS)
def test_sess_variants_follow_the_formula(algorithm: str) -> None:
    user, realm, password, nonce, cnonce = "bob", "lab.example", "pw:1", "n0nce", "c-n"
    challenge = Challenge(realm=realm, nonce=nonce, algorithm=algorithm, qop=("auth",))
    session = _session(user, password, cnonce=cnonce)
    first = AuthorizationParams.parse(session.authorize(challenge, "REGISTER", "sip:lab.example"))
    second = AuthorizationParams.parse(session.authorize(challenge, "REGISTER", "sip:lab.example"))

    ha1 = _hex(algorithm, f"{_hex(algorithm, f'{user}:{realm}:{password}')}:{nonce}:{cnonce}")
    ha2 = _hex(algorithm, "REGISTER:sip:lab.example")
    for params, nc in ((first, "00000001"), (second, "00000002")):
        assert params.response == _hex(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        assert params.algorithm == algorithm
        assert params.cnonce == cnonce


def test_sess_keeps_cnonce_for_the_nonce_and_plain_uses_a_fresh_one() -> None:
    challenge = Challenge(realm="r", nonce="n", algorithm="MD5-sess", qop=("auth",))
    session = _counter_session()
    cnonces = {
        AuthorizationParams.parse(session.authorize(challenge, "REGISTER", "sip:r")).cnonce for _ in range(2)
    }
    assert cnonces == {"cn1"}  # the session key binds the first cnonce
    plain = Challenge(realm="p", nonce="n", qop=("auth",))
    cnonces = {
        AuthorizationParams.parse(session.authorize(plain, "REGISTER", "sip:p")).cnonce for _ in range(2)
    }
    assert len(cnonces) == 2


@pytest.mark.parametrize("algorithm", SUPPORTED_BASES)
def test_auth_int_hashes_the_body(algorithm: str) -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"
    challenge = Challenge(realm="r", nonce="n", algorithm=algorithm, qop=("auth-int",))
    params = AuthorizationParams.parse(
        _session("u", "p", "cn").authorize(challenge, "INVITE", "sip:b@r", body)
    )
    ha1 = _hex(algorithm, "u:r:p")
    ha2 = _hex(algorithm, f"INVITE:sip:b@r:{_hex(algorithm, body)}")
    assert params.qop == "auth-int"
    assert params.response == _hex(algorithm, f"{ha1}:n:00000001:cn:auth-int:{ha2}")


@pytest.mark.parametrize("algorithm", SUPPORTED_BASES)
def test_no_qop_is_rfc2069_mode(algorithm: str) -> None:
    challenge = Challenge.parse(f'Digest realm="r", nonce="abc", algorithm={algorithm}')
    header = _session("u", "p").authorize(challenge, "REGISTER", "sip:r")
    params = AuthorizationParams.parse(header)
    expected = _hex(algorithm, f"{_hex(algorithm, 'u:r:p')}:abc:{_hex(algorithm, 'REGISTER:sip:r')}")
    assert params.response == expected
    assert (params.qop, params.nc, params.cnonce) == (None, None, None)
    assert "cnonce" not in header and "nc=" not in header


def test_sess_without_qop_is_unsupported() -> None:
    with pytest.raises(DigestError):
        Challenge.parse('Digest realm="r", nonce="n", algorithm=MD5-sess')


# --------------------------------------------------------------------------- qop choice


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ('qop="auth,auth-int"', "auth"),
        ('qop="auth-int, auth"', "auth"),
        ('qop="auth-int"', "auth-int"),
        ("qop=auth", "auth"),
        ('qop="token-x, AUTH"', "auth"),
        ("", None),
    ],
)
def test_qop_choice(offered: str, chosen: str | None) -> None:
    challenge = Challenge.parse(f'Digest realm="r", nonce="n", {offered}')
    params = AuthorizationParams.parse(_session("u", "p").authorize(challenge, "OPTIONS", "sip:r"))
    assert params.qop == chosen


def test_unknown_qop_only_is_unsupported() -> None:
    with pytest.raises(DigestError, match="qop"):
        Challenge.parse('Digest realm="r", nonce="n", qop="auth-conf"')


# --------------------------------------------------------------------------- nc and stale


def _nc(session: DigestSession, challenge: Challenge) -> str | None:
    return AuthorizationParams.parse(session.authorize(challenge, "REGISTER", "sip:r")).nc


def test_nc_increments_per_nonce_reuse_and_resets_on_a_new_nonce() -> None:
    session = _counter_session()
    first = Challenge(realm="r", nonce="one", qop=("auth",))
    assert [_nc(session, first) for _ in range(11)] == [f"{i:08x}" for i in range(1, 12)]
    assert _nc(session, first) == "0000000c"  # lower-case hex, 8 digits
    assert _nc(session, Challenge(realm="r", nonce="two", qop=("auth",))) == "00000001"
    assert _nc(session, Challenge(realm="r", nonce="two", qop=("auth",))) == "00000002"


def test_nc_is_counted_per_realm() -> None:
    session = _counter_session()
    registrar = Challenge(realm="registrar", nonce="same", qop=("auth",))
    proxy = Challenge(realm="proxy", nonce="other", qop=("auth",))
    assert [_nc(session, registrar), _nc(session, proxy), _nc(session, registrar)] == [
        "00000001",
        "00000001",
        "00000002",
    ]


def test_stale_challenge_is_a_fresh_start_not_a_failure() -> None:
    session = _counter_session()
    old = Challenge.parse(make_challenge("r", nonce="old"))
    for _ in range(3):
        session.authorize(old, "REGISTER", "sip:r")
    stale = Challenge.parse(make_challenge("r", nonce="new", stale=True))
    assert stale.stale
    assert not session.credentials_rejected(stale)
    params = AuthorizationParams.parse(session.authorize(stale, "REGISTER", "sip:r"))
    assert (params.nonce, params.nc) == ("new", "00000001")
    assert verify_authorization(params, "REGISTER", "secret")


def test_credentials_rejected_only_after_a_fresh_nonce_is_challenged_again() -> None:
    session = _counter_session()
    first = Challenge(realm="r", nonce="a", qop=("auth",))
    assert not session.credentials_rejected(first)  # never answered: just authenticate
    session.authorize(first, "REGISTER", "sip:r")
    again = Challenge(realm="r", nonce="b", qop=("auth",))
    assert session.credentials_rejected(again)
    assert not session.credentials_rejected(Challenge(realm="r", nonce="b", qop=("auth",), stale=True))
    session.authorize(again, "REGISTER", "sip:r")
    session.authorize(again, "REGISTER", "sip:r")  # reuse: the server may not accept that
    assert not session.credentials_rejected(Challenge(realm="r", nonce="c", qop=("auth",)))


# --------------------------------------------------------------------------- choosing


def _offer(algorithm: str, nonce: str = "n", realm: str = "r") -> str:
    return f'Digest realm="{realm}", nonce="{nonce}", qop="auth", algorithm={algorithm}'


@pytest.mark.skipif("SHA-512-256" not in SUPPORTED, reason="hashlib lacks sha512_256")
def test_choose_prefers_sha512_256_then_sha256_then_md5() -> None:
    offers = [_offer("MD5"), _offer("AKAv1-MD5"), _offer("SHA-256"), _offer("SHA-512-256"), _offer("SHA-1")]
    challenges = parse_challenges(offers)
    assert [c.algorithm for c in challenges] == ["MD5", "SHA-256", "SHA-512-256"]
    chosen = choose_challenge(challenges)
    assert chosen is not None and chosen.algorithm == "SHA-512-256"
    chosen = choose_challenge(c for c in challenges if c.algorithm != "SHA-512-256")
    assert chosen is not None and chosen.algorithm == "SHA-256"


def test_choose_ignores_unsupported_algorithms() -> None:
    unsupported = [
        Challenge(realm="r", nonce="1", algorithm="AKAv1-MD5", qop=("auth",)),
        Challenge(realm="r", nonce="2", algorithm="SHA-1", qop=("auth",)),
        Challenge(realm="r", nonce="3", algorithm="MD5", qop=("auth-conf",)),
        Challenge(realm="r", nonce="4", scheme="Basic"),
    ]
    md5 = Challenge(realm="r", nonce="5", algorithm="MD5", qop=("auth",))
    assert choose_challenge(unsupported) is None
    assert choose_challenge([*unsupported, md5]) == md5
    assert choose_challenge([]) is None


def test_choose_breaks_ties_by_server_order_and_ranks_sess_with_its_base() -> None:
    challenges = parse_challenges([_offer("MD5-sess", "1"), _offer("MD5", "2"), _offer("MD5-sess", "3")])
    chosen = choose_challenge(challenges)
    assert chosen is not None and chosen.nonce == "1"
    chosen = choose_challenge(parse_challenges([_offer("MD5", "1"), _offer("SHA-256-sess", "2")]))
    assert chosen is not None and chosen.algorithm == "SHA-256-sess"


def test_choose_per_realm() -> None:
    challenges = parse_challenges(
        [_offer("MD5", "1", "proxy"), _offer("MD5", "2", "registrar"), _offer("SHA-256", "3", "proxy")]
    )
    assert [(c.realm, c.nonce) for c in choose_per_realm(challenges)] == [("proxy", "3"), ("registrar", "2")]


def test_parse_challenges_skips_what_it_cannot_answer() -> None:
    values = [
        'Basic realm="x"',
        "garbage ===",
        'Digest realm="x"',  # no nonce
        'Digest realm="x", nonce="y", algorithm=SHA-1',
        'Digest realm="unterminated',
        'Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==, Digest realm="ok", nonce="1"',
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Digest realm="ok2", nonce="2"',
    ]
    assert [c.realm for c in parse_challenges(values)] == ["ok", "ok2"]
    assert [c.realm for c in parse_challenges('Digest realm="one", nonce="1"')] == ["one"]


def test_header_names() -> None:
    assert header_names(401) == ("WWW-Authenticate", "Authorization")
    assert header_names(407) == ("Proxy-Authenticate", "Proxy-Authorization")
    with pytest.raises(ValueError):
        header_names(403)


# --------------------------------------------------------------------------- parsing


def test_parse_quoting_whitespace_and_case() -> None:
    challenge = Challenge.parse(
        'dIgEsT  REALM = "a \\"quoted\\", realm\\\\" ,, NONCE="n,1",Algorithm = sha-256-SESS ,'
        ' QOP="Auth" , opaque="" , stale=TRUE, domain="sip:a sip:b", userhash=True, charset=UTF-8'
    )
    assert challenge == Challenge(
        realm='a "quoted", realm\\',
        nonce="n,1",
        algorithm="SHA-256-sess",
        qop=("auth",),
        opaque="",
        stale=True,
        userhash=True,
        domain="sip:a sip:b",
    )


def test_parse_defaults_and_unquoted_values() -> None:
    challenge = Challenge.parse("Digest realm=lab, nonce=abc123, stale=false")
    assert challenge == Challenge(realm="lab", nonce="abc123")
    assert challenge.algorithm == "MD5" and challenge.qop == () and challenge.scheme == "Digest"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "Digest",
        'Digest nonce="n"',
        'Digest realm="r"',
        'Digest realm="", nonce="n"',
        'Digest realm="r", nonce=""',
        'Basic realm="r"',
        'Digest realm="r", nonce="n", algorithm=SHA-1',
        'Digest realm="r", nonce="n", algorithm=AKAv1-MD5',
        'Digest realm="r, nonce="n"',
        'Digest realm="r", realm="s", nonce="n"',
        'Digest realm="r\r\nVia: injected", nonce="n"',
        'Digest realm="r", nonce="n", Digest realm="s", nonce="m"',
        'Digest realm="r", nonce="n", @="x"',
    ],
)
def test_parse_rejects(value: str) -> None:
    with pytest.raises(DigestError):
        Challenge.parse(value)


_HEADERISH = st.text(alphabet='Digest realmnoc=",\\ \t\r\nqopauthlgrihMD5SHA-256sessal', max_size=120)


@given(st.one_of(st.text(max_size=200), _HEADERISH, _HEADERISH.map(lambda s: "Digest " + s)))
def test_fuzz_parsers_only_raise_digest_error(value: str) -> None:
    for parse in (Challenge.parse, AuthorizationParams.parse):
        try:
            parse(value)
        except DigestError:
            pass
    assert all(isinstance(c, Challenge) for c in parse_challenges([value, value]))


@given(st.lists(st.text(max_size=80), max_size=5))
def test_fuzz_parse_challenges_never_raises(values: list[str]) -> None:
    parse_challenges(values)


# --------------------------------------------------------------------------- secrecy


def test_password_stays_out_of_reprs_and_errors() -> None:
    password = "hunter2-very-secret"
    credentials = Credentials("alice", password)
    assert password not in repr(credentials) and password not in str(credentials)
    session = DigestSession(Credentials("ali\r\nce", password))
    assert password not in repr(session)
    with pytest.raises(DigestError) as caught:
        session.authorize(Challenge(realm="r", nonce="n", qop=("auth",)), "REGISTER", "sip:r")
    assert password not in str(caught.value) and password not in repr(caught.value)
    with pytest.raises(DigestError) as caught:
        session.authorize(Challenge(realm="r", nonce="n", algorithm="SHA-1"), "REGISTER", "sip:r")
    assert password not in str(caught.value)
