"""Held calls on a fake clock: provisional responses, T1/T2, release after the binding is gone,
CANCEL and answered-elsewhere, unknown/off instances, several calls at once, MESSAGE rules, push
records and operator actions. The SIP transaction side is replaced by a recorder of responses
(the real transaction layer is covered by the SIP tests and the end-to-end call test)."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from contract.codec import payload_data
from contract.documents import PushRecord
from sipis.api.models import AccountIn, EnrollIn, PushIn
from sipis.calls import CallManager, Stage
from sipis.clock import FakeClock
from sipis.config import CallsConfig, SipConfig
from sipis.engine import RegistrationEngine
from sipis.events import Event, EventBus
from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle
from sipis.operations import Forbidden, Operations, Operator
from sipis.proxy_register import contact_user
from sipis.push.base import PushKind, PushOutcome, PushRequest, Verdict
from sipis.push.delivery import PushDelivery, RetryPolicy
from sipis.service import InstanceService
from sipis.sip.message import Headers, Request
from sipis.sip.register import Outcome, RegisterResult
from sipis.text_messages import TextMessages
from sipis.timers import FakeTimers


class FakeIncoming:
    """Stands in for the server transaction: records what the call logic answers."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.responses: list[tuple[int, dict[str, str]]] = []
        self.final: int | None = None
        self._cancel: list[Callable[[Request], None]] = []

    def respond(self, status: int, reason: str | None = None, *, headers: list[tuple[str, str]] | tuple[()] = (),
                body: bytes = b"") -> bool:
        if self.final is not None:
            return False
        self.responses.append((status, dict(headers)))
        if status >= 200:
            self.final = status
        return True

    def on_cancel(self, callback: Callable[[Request], None]) -> None:
        self._cancel.append(callback)

    def cancel(self, reason: str | None = None) -> None:
        """What the endpoint does on CANCEL: 487 to the INVITE, then the callbacks."""
        headers = Headers([("Reason", reason)]) if reason else Headers()
        cancel = Request("CANCEL", self.request.uri, headers)
        self.respond(487)
        for callback in self._cancel:
            callback(cancel)

    def push_statuses(self) -> list[str]:
        return [h["X-Sipis-Push-Status"] for status, h in self.responses if status == 180]


@dataclass
class FakeProvider:
    name: str = "mediator"
    type: str = "acrobits"
    script: list[PushOutcome] = field(default_factory=list)
    sent: list[PushRequest] = field(default_factory=list)
    eager_send: bool = False  # safe to start eagerly (the real HTTP providers are)
    gate: asyncio.Future[None] | None = None  # set: send waits for it (an answer in flight)
    on_send: Callable[[PushRequest], None] | None = None

    async def send(self, request: PushRequest) -> PushOutcome:
        self.sent.append(request)
        if self.on_send is not None:
            self.on_send(request)
        if self.gate is not None:
            await self.gate
        return self.script.pop(0) if self.script else PushOutcome(Verdict.ACCEPTED, 200)

    async def close(self) -> None:
        pass


class AcceptingRegistrar:
    def __init__(self) -> None:
        self.calls: list[int] = []

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        self.calls.append(expires)
        return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)

    def forget(self, selector: str) -> None:
        pass


@dataclass
class World:
    clock: FakeClock
    timers: FakeTimers
    bus: EventBus
    events: list[Event]
    provider: FakeProvider
    registrar: AcceptingRegistrar
    engine: RegistrationEngine
    service: InstanceService
    delivery: PushDelivery
    calls: CallManager
    messages: TextMessages
    operations: Operations

    async def settle(self, seconds: float = 0.0) -> None:
        self.timers.advance(seconds)
        self.engine.tick()
        for _ in range(5):
            await asyncio.sleep(0)
            await self.engine.drain()
            await self.calls.drain()

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def make_world(*, eager: bool = False, **call_settings: object) -> World:
    clock = FakeClock()
    timers = FakeTimers(clock)
    bus = EventBus(clock)
    events: list[Event] = []
    bus.subscribe(events.append)
    provider = FakeProvider(eager_send=eager)
    registrar = AcceptingRegistrar()
    engine = RegistrationEngine(registrar, bus, clock, SipConfig(register_rate=1000), rng=random.Random(3))
    lifecycle = InstanceLifecycle(engine=engine, registrar=registrar, bus=bus, clock=clock)  # type: ignore[arg-type]
    delivery = PushDelivery({"mediator": provider}, bus, clock, retry=RetryPolicy(max_attempts=3, backoff_base=0.0),
                            rng=random.Random(1))
    settings = CallsConfig(**{"wake_timeout": 10.0, "answer_timeout": 20.0, **call_settings})  # type: ignore[arg-type]
    calls = CallManager(lifecycle=lifecycle, delivery=delivery, bus=bus, clock=clock, timers=timers, settings=settings)
    service = InstanceService(lifecycle=lifecycle, registrar=registrar, bus=bus, clock=clock,  # type: ignore[arg-type]
                              enroll_tokens=("e",), calls=calls)
    messages = TextMessages(lifecycle=lifecycle, delivery=delivery, bus=bus, clock=clock, max_body=1000)
    operations = Operations(service=service, lifecycle=lifecycle, delivery=delivery, bus=bus, clock=clock)
    return World(clock, timers, bus, events, provider, registrar, engine, service, delivery, calls, messages,
                 operations)


async def sleeping_instance(w: World, user: str = "alice", voip_token: str | None = None) -> Instance:
    instance, _ = await w.service.enroll(EnrollIn(
        account=AccountIn(aor=f"sip:{user}@pbx.example.com", username=user, password="pw"),  # type: ignore[arg-type]
        push=PushIn(provider="mediator", app_id="com.example", token=f"token-{user}", voip_token=voip_token),
    ))
    await w.service.set_state(instance.selector, "inactive", None)
    await w.settle()
    assert instance.state.value == "proxied"
    return instance


def invite(instance: Instance | None, call_id: str = "call-1", user: str | None = None) -> FakeIncoming:
    target = user or (contact_user(instance) if instance else "nobody")
    headers = Headers([("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1"),
                       ("From", '"Bob" <sip:bob@pbx.example.com>;tag=1'), ("To", "<sip:alice@pbx.example.com>"),
                       ("Call-ID", call_id), ("CSeq", "1 INVITE")])
    return FakeIncoming(Request("INVITE", f"sip:{target}@127.0.0.1:5070", headers))


@pytest.mark.parametrize("eager", [False, True])
async def test_held_call_alerts_pushes_progresses_and_is_released_with_302(eager: bool) -> None:
    w = make_world(eager=eager)
    instance = await sleeping_instance(w)
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    assert call.push_statuses() == ["Alerting-Device", "Push-Notification-Sent"]
    push_id = call.responses[0][1]["X-Push-ID"]
    sent = w.provider.sent[0]
    assert sent.kind is PushKind.CALL and sent.push_id == push_id and sent.call_id == "call-1"
    assert sent.caller == "sip:bob@pbx.example.com" and sent.sent_at == w.clock.wall()
    assert 0 < sent.ttl <= 10.0  # never longer than the wake timer

    w.calls.progress(instance.selector, push_id)
    w.calls.progress(instance.selector, push_id)  # repeated progress is ignored
    assert call.push_statuses() == ["Alerting-Device", "Push-Notification-Sent", "Device-Making-Progress"]
    await w.settle(15.0)  # past T1: T1 was replaced by T2, nothing ends
    assert call.final is None

    await w.service.set_state(instance.selector, "active", "sip:alice@10.0.0.7:5060;transport=tcp")
    assert call.final is None  # the release waits for our binding to be removed
    await w.settle()
    assert w.registrar.calls[-1] == 0
    status, headers = call.responses[-1]
    assert status == 302 and headers["Contact"] == "<sip:alice@10.0.0.7:5060;transport=tcp>"
    assert headers["X-Push-ID"] == push_id
    trace = w.delivery.trace(push_id)
    assert trace is not None
    assert list(trace.stages) == ["invite_received", "push_sent", "provider_accepted", "device_progress",
                                  "app_active", "released"]
    assert w.calls.outcomes == {"released": 1}
    ended = w.calls.recent[-1]
    assert ended.incoming is None and ended.timer is None  # the summary stays, the transaction goes


async def test_release_without_contact_points_at_the_aor_and_reject_mode_answers_480() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    await w.service.set_state(instance.selector, "active", None)
    await w.settle()
    assert call.responses[-1][0] == 302 and call.responses[-1][1]["Contact"] == "<sip:alice@pbx.example.com>"

    w2 = make_world(release="reject")
    instance2 = await sleeping_instance(w2)
    call2 = invite(instance2)
    w2.calls.on_invite(call2)  # type: ignore[arg-type]
    await w2.settle()
    await w2.service.set_state(instance2.selector, "active", None)
    await w2.settle()
    assert call2.final == 480 and "Contact" not in call2.responses[-1][1]


async def test_t1_expiry_gives_480_no_response_from_device() -> None:
    w = make_world(no_response_status=486, no_response_reason="Busy Here")
    instance = await sleeping_instance(w)
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle(9.9)
    assert call.final is None
    await w.settle(0.2)
    assert call.final == 486  # the T1 response is configurable
    assert call.responses[-1][1]["X-Sipis-Reason"] == "No-Response-From-Device"


async def test_t2_expiry_gives_480_device_did_not_answer() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle(5.0)
    w.calls.progress(instance.selector, call.responses[0][1]["X-Push-ID"])
    await w.settle(19.9)
    assert call.final is None
    await w.settle(0.2)
    assert call.final == 480 and call.responses[-1][1]["X-Sipis-Reason"] == "Device-Did-Not-Answer"


async def test_cancel_sends_missed_push_and_cause_200_answered_elsewhere() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    first, second = invite(instance, "call-a"), invite(instance, "call-b")
    w.calls.on_invite(first)  # type: ignore[arg-type]
    w.calls.on_invite(second)  # type: ignore[arg-type]  # two calls to one instance at once
    await w.settle()
    first.cancel()
    second.cancel("SIP;cause=200;text=\"Call completed elsewhere\"")
    await w.settle()
    kinds = [r.kind for r in w.provider.sent]
    assert kinds.count(PushKind.CALL) == 2
    assert PushKind.MISSED in kinds and PushKind.ANSWERED_ELSEWHERE in kinds
    assert all(not r.voip for r in w.provider.sent if r.kind is not PushKind.CALL)
    assert w.calls.outcomes == {"cancelled": 1, "answered-elsewhere": 1}
    assert not w.calls.held


async def test_voip_token_only_for_calls() -> None:
    w = make_world()
    instance = await sleeping_instance(w, voip_token="voip-token-1")
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    call.cancel()
    await w.settle()
    by_kind = {r.kind: r for r in w.provider.sent}
    assert by_kind[PushKind.CALL].voip and by_kind[PushKind.CALL].token == "voip-token-1"
    assert not by_kind[PushKind.MISSED].voip and by_kind[PushKind.MISSED].token == "token-alice"


async def test_unknown_and_off_instances_are_answered_at_once() -> None:
    w = make_world()
    unknown = invite(None, user="sipis-0000")
    w.calls.on_invite(unknown)  # type: ignore[arg-type]
    assert unknown.final == 404
    instance = await sleeping_instance(w)
    retiring = asyncio.ensure_future(w.service.lifecycle.retire(instance, reason="test", delete=False))
    await asyncio.sleep(0)
    await w.settle()
    await retiring
    off = invite(instance)
    w.calls.on_invite(off)  # type: ignore[arg-type]
    assert off.final == 480
    assert not w.provider.sent


@pytest.mark.parametrize("eager", [False, True])
async def test_transient_push_failures_retry_then_a_dead_token_ends_the_call(eager: bool) -> None:
    w = make_world(eager=eager)
    instance = await sleeping_instance(w)
    w.provider.script = [PushOutcome(Verdict.REJECTED_TRANSIENT, 503),
                         PushOutcome(Verdict.REJECTED_PERMANENT, 404, "Unregistered", token_dead=True)]
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    assert len(w.provider.sent) == 2
    assert call.final == 480 and call.responses[-1][1]["X-Sipis-Reason"] == "Device-Unreachable"
    assert instance.push.unreachable
    assert any(payload_data(e.payload).get("alarm") == "push-rejected" for e in w.events_of("alarm"))
    again = invite(instance, "call-2")
    w.calls.on_invite(again)  # type: ignore[arg-type]
    await w.settle()
    assert len(w.provider.sent) == 2  # no more pushes to a dead token
    assert again.final == 480


async def test_push_records_are_published_with_outcome_and_attempts() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    w.provider.script = [PushOutcome(Verdict.REJECTED_TRANSIENT, 503), PushOutcome(Verdict.ACCEPTED, 200)]
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    last = payload_data(w.events_of("push")[-1].payload)
    assert last["outcome"] == "accepted" and last["attempt"] == 2 and last["kind"] == "call"
    assert "token-alice" not in str(last["request_summary"])  # tokens are masked in records


async def test_message_rules() -> None:
    w = make_world()
    instance = await sleeping_instance(w)

    def message(body: bytes, content_type: str) -> FakeIncoming:
        headers = Headers([("Via", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK2"), ("From", "<sip:bob@x>;tag=2"),
                           ("To", "<sip:alice@x>"), ("Call-ID", "m1"), ("CSeq", "1 MESSAGE"),
                           ("Content-Type", content_type)])
        return FakeIncoming(Request("MESSAGE", f"sip:{contact_user(instance)}@127.0.0.1", headers, body))

    big = message(b"x" * 1001, "text/plain")
    w.messages.on_message(big)  # type: ignore[arg-type]
    typing = message(b"<isComposing/>", "application/im-iscomposing+xml")
    w.messages.on_message(typing)  # type: ignore[arg-type]
    receipt = message(b"<imdn/>", "message/imdn+xml")
    w.messages.on_message(receipt)  # type: ignore[arg-type]
    text = message(b"hello there", "text/plain")
    w.messages.on_message(text)  # type: ignore[arg-type]
    await w.settle()
    assert big.final == 413 and typing.final == 200 and receipt.final == 200 and text.final == 200
    assert [(r.kind, r.message) for r in w.provider.sent] == [(PushKind.TEXT, "hello there")]


async def test_operator_test_and_replay_push_are_role_checked_and_audited() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    noc = Operator("noc-anna", "operator")
    viewer = Operator("watcher", "viewer")
    trace = await w.operations.test_push(instance.selector, noc)
    assert w.provider.sent[-1].kind is PushKind.TEST
    with pytest.raises(Forbidden):
        await w.operations.test_push(instance.selector, viewer)
    replay = await w.operations.replay_push(trace.push_id, noc)
    assert replay.replay_of == trace.push_id and replay.push_id != trace.push_id
    audit = [payload_data(e.payload) for e in w.events_of("audit")]
    assert [(a["operator"], a["action"], a["outcome"]) for a in audit] == [
        ("noc-anna", "test_push", "accepted"), ("watcher", "test_push", "refused"),
        ("noc-anna", "replay_push", "accepted")]
    assert w.calls.held == {}
    assert Stage.ENDED.value == "Ended"


async def test_shutdown_ends_held_calls_and_stops_their_timers() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    await w.settle()
    await w.calls.close()
    assert call.final == 480 and call.responses[-1][1]["X-Sipis-Reason"] == "Shutting-Down"
    assert not w.calls.held and w.timers.pending == 0


async def test_eager_push_goes_out_before_the_180_with_the_collector_off() -> None:
    w = make_world(eager=True)
    instance = await sleeping_instance(w)
    call = invite(instance)
    at_send: list[tuple[int, bool]] = []
    w.provider.on_send = lambda request: at_send.append((len(call.responses), gc.isenabled()))
    w.provider.gate = asyncio.get_running_loop().create_future()
    w.calls.on_invite(call)  # type: ignore[arg-type]
    assert at_send == [(0, False)]  # the push went out before any 180, with the collector off
    assert call.push_statuses() == ["Alerting-Device"] and gc.isenabled()
    trace = w.delivery.trace(call.responses[0][1]["X-Push-ID"])
    assert trace is not None and list(trace.stages) == ["invite_received", "push_sent"]
    assert not w.events_of("push")  # published in the loop's next turn, after the handler
    await asyncio.sleep(0)
    [pending] = w.events_of("push")
    assert isinstance(pending.payload, PushRecord)
    assert pending.payload.outcome == "pending" and list(pending.payload.stages) == ["invite_received", "push_sent"]
    w.provider.gate.set_result(None)
    await w.settle()
    assert call.push_statuses() == ["Alerting-Device", "Push-Notification-Sent"]
    assert [payload_data(e.payload)["outcome"] for e in w.events_of("push")] == ["pending", "accepted"]

    gc.disable()
    try:
        w.provider.on_send, w.provider.gate = None, None
        w.calls.on_invite(invite(instance, "call-2"))  # type: ignore[arg-type]
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()


async def test_eager_push_that_cannot_go_out_still_alerts_first_and_leaves_no_timer() -> None:
    w = make_world(eager=True)
    instance = await sleeping_instance(w)
    instance.push.unreachable = True
    call = invite(instance)
    w.calls.on_invite(call)  # type: ignore[arg-type]
    assert [status for status, _ in call.responses] == [180, 480]
    assert call.responses[-1][1]["X-Sipis-Reason"] == "Device-Unreachable"
    assert not w.calls.held and w.timers.pending == 0
    await w.settle()
    assert not w.provider.sent and w.calls.outcomes == {"push-rejected": 1}


async def test_push_sent_is_published_once_even_when_the_answer_comes_at_once() -> None:
    w = make_world()
    instance = await sleeping_instance(w)
    w.calls.on_invite(invite(instance))  # type: ignore[arg-type]
    await w.settle()
    pushes = w.events_of("push")
    assert [payload_data(e.payload)["outcome"] for e in pushes][-1] == "accepted"
    # no event without it, none stale after
    assert all("push_sent" in payload_data(e.payload)["stages"] for e in pushes)
    assert payload_data(pushes[-1].payload)["stages"].keys() >= {"invite_received", "push_sent", "provider_accepted"}
