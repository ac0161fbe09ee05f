"""Fencing at a real Kamailio: two nodes register one instance; the higher epoch wins.

Each "node" is its own SIP endpoint (its own port, so its own Contact) with its own
:class:`ProxyRegistrar` and its own copy of the instance, as two SIPIS processes would hold it.
Both derive the same Call-ID from the instance, and count CSeqs in the epoch of the lease they
were given: the registrar replaces the older owner's binding (RFC 5626: same +sip.instance and
reg-id) and refuses the older owner's later REGISTERs (RFC 3261 §10.3: same Call-ID, lower CSeq).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from lab.kamailio import Kamailio, UlContact
from sipis.instance import Account, Instance, PushTarget
from sipis.proxy_register import ProxyRegistrar, contact_user
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.register import EPOCH_SHIFT, Outcome, RegisterResult
from sipis.sip.resolver import Resolver
from sipis.sip.transport import ListenSpec

pytestmark = pytest.mark.integration


class Node:
    def __init__(self, endpoint: SipEndpoint, instance: Instance) -> None:
        self.endpoint = endpoint
        self.registrar = ProxyRegistrar(endpoint, Resolver())
        self.instance = instance
        self.port = 0  # of its Contact: the local end of its flow to the registrar

    async def register(self, expires: int = 120) -> RegisterResult:
        result = await self.registrar(self.instance, expires)
        if result.flow is not None:
            self.port = result.flow.local[1]
        return result


@pytest.fixture
async def nodes(kamailio: Kamailio) -> AsyncIterator[tuple[Node, Node]]:
    instance = Instance(
        selector="sel-alice",
        account=Account(aor=kamailio.aor("alice"), username="alice", password="alicepw",
                        registrar=kamailio.uri("tcp")),
        push=PushTarget(provider="fcm", app_id="com.example.app", token="push-token-0123456789"),
        token_hash="not-a-real-hash",
    )
    made: list[Node] = []
    for _ in range(2):
        endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec.parse("tcp:127.0.0.1:0")]))
        await endpoint.start()
        made.append(Node(endpoint, dataclasses.replace(instance)))
    yield made[0], made[1]
    for node in made:
        await node.endpoint.close()


def bindings(kam: Kamailio, instance: Instance) -> list[UlContact]:
    return [c for c in kam.ul_dump() if f"{contact_user(instance)}@" in c["contact"]]


async def test_the_higher_epoch_replaces_the_binding(kamailio: Kamailio, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.instance.epoch, b.instance.epoch = 1, 2

    first = await a.register()
    assert first.outcome is Outcome.REGISTERED, first.detail
    (binding,) = bindings(kamailio, a.instance)
    assert f":{a.port};" in binding["contact"]

    taken = await b.register()  # b claimed the lease: epoch 2
    assert taken.outcome is Outcome.REGISTERED, taken.detail
    (binding,) = bindings(kamailio, a.instance)  # exactly one: b's replaced a's
    assert f":{b.port};" in binding["contact"]
    assert binding["cseq"] is not None and binding["cseq"] >> EPOCH_SHIFT == 2


async def test_kamailio_takes_a_lower_cseq_for_an_instance_so_a_node_fences_itself(
        kamailio: Kamailio, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.instance.epoch, b.instance.epoch = 1, 2
    assert (await a.register()).ok
    assert (await b.register()).ok

    # Kamailio 5.6 finds the binding by +sip.instance/reg-id and compares no CSeq then (RFC 3261
    # §10.3 compares them for the same Contact URI only, and each node's Contact is its own):
    # a stale node's REGISTER would take the binding back
    stale = await a.register()
    assert (stale.outcome, stale.status) == (Outcome.REGISTERED, 200)
    (binding,) = bindings(kamailio, a.instance)
    assert f":{a.port};" in binding["contact"]
    assert (await b.register()).ok

    # so a node checks its lease right before a REGISTER leaves, and one whose lease is gone sends none
    a.registrar.owns = lambda selector: False
    for expires in (120, 0):
        fenced = await a.register(expires)
        assert fenced.outcome is Outcome.FENCED
        assert fenced.transactions == 0
    (binding,) = bindings(kamailio, a.instance)
    assert f":{b.port};" in binding["contact"]  # untouched


async def test_the_call_id_is_the_same_on_every_node_and_across_restarts(
        kamailio: Kamailio, nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    a.instance.epoch = b.instance.epoch = 3
    assert (await a.register()).ok
    (first,) = bindings(kamailio, a.instance)
    b.instance.epoch = 4
    assert (await b.register()).ok
    (second,) = bindings(kamailio, a.instance)
    assert first["call_id"] == second["call_id"] is not None


async def test_a_used_up_epoch_is_replaced_before_the_cseq_would_overflow(
        kamailio: Kamailio, nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    a.instance.epoch = 5
    assert (await a.register()).ok
    binding = a.registrar._bindings[a.instance.selector]
    binding.cseq = (5 << EPOCH_SHIFT) | 0xFFFE  # as after ~65k REGISTERs in this epoch

    asked: list[str] = []

    async def new_epoch(instance: Instance) -> bool:
        asked.append(instance.selector)
        instance.epoch = 6
        return True

    a.registrar.new_epoch = new_epoch
    assert (await a.register()).ok
    assert asked == ["sel-alice"]
    (bound,) = bindings(kamailio, a.instance)
    assert bound["cseq"] == (6 << EPOCH_SHIFT) | 1

    async def lease_gone(instance: Instance) -> bool:
        return False

    binding.cseq = (6 << EPOCH_SHIFT) | 0xFFFE
    a.registrar.new_epoch = lease_gone
    assert (await a.register()).outcome is Outcome.FENCED
