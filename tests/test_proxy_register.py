"""ProxyRegistrar without a network: what it keeps per instance, and what instances share.

At 100k instances every per-instance copy of a value they all have in common (the registrar's
URI, the domain, a flow's key) costs megabytes, and every long-lived object built after start-up
lengthens the garbage collector's full passes; these tests pin down the sharing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sipis.instance import Account, Instance, PushTarget
from sipis.proxy_register import ProxyRegistrar, contact_user
from sipis.sip.register import Outcome
from sipis.sip.resolver import Resolver
from sipis.sip.transport import Flow, FlowClosedHandler


@dataclass
class FakeEndpoint:
    flow_closed_listeners: list[FlowClosedHandler] = field(default_factory=list)


def fresh(text: str) -> str:
    """A new string object with this value, as parsing each enrolment gives."""
    return text.encode().decode()


def make_instance(user: str, registrar: str | None = "sip:pbx.example.com;transport=tcp",
                  password: str | None = "pw") -> Instance:
    return Instance(
        selector=f"SEL-{user}",
        account=Account(aor=fresh(f"sip:{user}@pbx.example.com"), username=fresh(user), password=password,
                        registrar=fresh(registrar) if registrar is not None else None),
        push=PushTarget("fcm", "org.example", f"token-{user}"),
        token_hash=f"hash-{user}",
    )


def make_registrar(default_registrar: str | None = None) -> ProxyRegistrar:
    return ProxyRegistrar(FakeEndpoint(), Resolver(nameservers=[("127.0.0.1", 9)]),  # type: ignore[arg-type]
                          default_registrar=default_registrar)


def make_flow(remote_port: int = 5060) -> Flow:
    return Flow("tcp", ("127.0.0.1", 40000), ("192.0.2.1", remote_port), True, lambda _data: None, lambda: None)


def test_bindings_share_the_registrar_uri_and_the_aor_domain() -> None:
    registrar = make_registrar()
    alice, bob = make_instance("alice"), make_instance("bob")
    registrar.prepare(alice)
    registrar.prepare(bob)
    a, b = registrar._bindings[alice.selector], registrar._bindings[bob.selector]
    assert a.registrar is b.registrar and str(a.registrar) == "sip:pbx.example.com;transport=tcp"
    assert a.aor.host is b.aor.host and a.aor.scheme is b.aor.scheme
    assert a.aor.user is alice.account.username  # the account's string, not a copy
    assert str(a.aor) == "sip:alice@pbx.example.com" and a.request_uri == "sip:pbx.example.com"
    assert a.contact_params == {"+sip.instance": alice.sip_instance, "reg-id": "1"}
    assert a.contact_params["reg-id"] is b.contact_params["reg-id"]
    assert a.contact_user is contact_user(alice)  # the service's routing table holds the same string


def test_without_a_registrar_the_aor_domain_is_shared_as_one() -> None:
    registrar = make_registrar()
    alice, bob = make_instance("alice", registrar=None), make_instance("bob", registrar=None)
    registrar.prepare(alice)
    registrar.prepare(bob)
    a, b = registrar._bindings[alice.selector], registrar._bindings[bob.selector]
    assert a.registrar is b.registrar and str(a.registrar) == "sip:pbx.example.com"


def test_prepare_builds_the_binding_once_and_keeps_it() -> None:
    registrar = make_registrar()
    alice = make_instance("alice")
    registrar.prepare(alice)
    binding = registrar._bindings[alice.selector]
    registrar.prepare(alice)
    assert registrar._bindings[alice.selector] is binding  # same Call-ID and CSeq across refreshes
    alice.account = Account(aor=alice.account.aor, username="alice", password="new", registrar=None)
    registrar.prepare(alice)
    assert registrar._bindings[alice.selector] is not binding  # new credentials: a new binding


def test_prepare_leaves_bad_or_wiped_accounts_to_the_exchange() -> None:
    registrar = make_registrar()
    bad = make_instance("bad")
    bad.account.aor = "not a sip uri"
    wiped = make_instance("wiped", password=None)
    registrar.prepare(bad)
    registrar.prepare(wiped)
    assert registrar._bindings == {}
    result = asyncio.run(registrar(bad, 600))
    assert (result.outcome, result.status, result.transactions) == (Outcome.REJECTED, 400, 0)  # nothing sent
    result = asyncio.run(registrar(wiped, 600))
    assert (result.outcome, result.status, result.transactions) == (Outcome.UNAUTHORIZED, 403, 0)


def test_instances_on_one_flow_share_its_key_and_are_re_registered_when_it_dies() -> None:
    registrar = make_registrar()
    lost: list[list[str]] = []
    registrar.on_flow_lost = lost.append
    flow, other = make_flow(), make_flow(5080)
    for n in range(3):
        registrar._track(f"sel-{n}", flow, bound=True)
    registrar._track("sel-3", other, bound=True)
    registrar._track("sel-0", flow, bound=True)  # a refresh over the same flow
    keys = [registrar._flow_of[f"sel-{n}"] for n in range(3)]
    assert keys[0] is keys[1] is keys[2] and keys[0] == flow.key
    registrar._track("sel-2", flow, bound=False)  # its binding went away
    registrar._flow_closed(flow, "closed by peer")
    assert lost == [["sel-0", "sel-1"]]
    assert set(registrar._flow_of) == {"sel-3"} and set(registrar._flow_keys) == {other.key}
    registrar._flow_closed(make_flow(), "closed again")  # nobody on it any more
    assert lost == [["sel-0", "sel-1"]]
    registrar.forget("sel-3")
    assert registrar._flow_of == {}
    registrar._flow_closed(other, "closed by peer")
    assert lost == [["sel-0", "sel-1"]] and registrar._flow_keys == {}


async def test_registrar_addresses_are_known_before_the_first_register_after_a_restart() -> None:
    """A restored binding's registrar may deliver a call before our paced REGISTER reaches it."""
    registrar = make_registrar()
    instance = make_instance("alice", registrar="sip:192.0.2.1;transport=tcp")
    registrar.prepare(instance)
    assert not registrar.from_registrar(instance.selector, make_flow())  # nothing known yet
    await registrar.learn_registrars()
    assert registrar.from_registrar(instance.selector, make_flow(40123))  # its address, any port
    stranger = Flow("tcp", ("127.0.0.1", 40000), ("192.0.2.99", 5060), True, lambda _data: None, lambda: None)
    assert not registrar.from_registrar(instance.selector, stranger)
