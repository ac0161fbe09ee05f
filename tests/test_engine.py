"""The registration engine driven by a fake clock and a scripted REGISTER exchange.

Pattern: ``clock.advance(x); engine.tick(); await engine.drain()``. The fake exchange records every
call (selector, expires asked, fake monotonic time) and answers from a per-instance script; when
the script runs dry the registrar grants what was asked.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from contract.codec import payload_data
from contract.events import HealthChanged
from contract.kinds import HealthState, HealthSubject
from sipis.clock import FakeClock
from sipis.config import SipConfig
from sipis.engine import MAX_AGENT, PROBE_INTERVAL, RegistrationEngine
from sipis.events import Event, EventBus
from sipis.instance import Account, AppState, Instance, PushTarget, RegStatus
from sipis.lifecycle import InstanceLifecycle
from sipis.sip.message import Response, parse_message
from sipis.sip.register import Outcome, RegisterResult
from sipis.sip.transport import Flow

START = 1000.0  # FakeClock's monotonic start
SEEDS = [0, 1, 7, 42, 2024]


# ---------------------------------------------------------------------------------------- fakes


def ok(expires: int = 600) -> RegisterResult:
    return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)


def failed(status: int = 408, reason: str = "Request Timeout", retry_after: float | None = None) -> RegisterResult:
    return RegisterResult(Outcome.FAILED, status, reason, retry_after=retry_after)


def unauthorized(status: int = 403) -> RegisterResult:
    return RegisterResult(Outcome.UNAUTHORIZED, status, "Forbidden" if status == 403 else "Unauthorized")


@dataclass
class Gate:
    """A scripted step that waits for ``event`` before answering ``result`` (a REGISTER in flight)."""

    event: asyncio.Event
    result: RegisterResult


Step = RegisterResult | Exception | Gate


@dataclass(frozen=True)
class Call:
    selector: str
    expires: int
    at: float  # fake monotonic time the exchange started


@dataclass
class FakeExchange:
    clock: FakeClock
    calls: list[Call] = field(default_factory=list)
    steps: dict[str, deque[Step]] = field(default_factory=dict)
    #: REGISTER transactions each unscripted answer reports (2: challenged, then accepted)
    transactions: int = 1

    def script(self, selector: str, *steps: Step) -> None:
        self.steps.setdefault(selector, deque()).extend(steps)

    def of(self, selector: str) -> list[Call]:
        return [c for c in self.calls if c.selector == selector]

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        self.calls.append(Call(instance.selector, expires, self.clock.monotonic()))
        queue = self.steps.get(instance.selector)
        step: Step = queue.popleft() if queue else ok(expires)
        if not queue and isinstance(step, RegisterResult):
            step.transactions = self.transactions
        if isinstance(step, Gate):
            await step.event.wait()
            step = step.result
        if isinstance(step, Exception):
            raise step
        return step


@dataclass
class Harness:
    clock: FakeClock
    exchange: FakeExchange
    engine: RegistrationEngine
    events: list[Event]
    life: InstanceLifecycle

    async def step(self, seconds: float = 0.0) -> float | None:
        """Advance the fake clock, start what is due, let the exchanges finish."""
        self.clock.advance(seconds)
        delay = self.engine.tick()
        await self.engine.drain()
        return delay

    async def run_for(self, seconds: float, step: float = 0.125) -> None:
        elapsed = 0.0
        while elapsed < seconds:
            await self.step(step)
            elapsed += step

    def next_due(self) -> float | None:
        """Seconds until the engine's next due item (nothing may be due now)."""
        before = len(self.exchange.calls)
        delay = self.engine.tick()
        assert len(self.exchange.calls) == before and not self.engine._tasks, "something was due now"
        return delay

    def of_kind(self, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
        return [payload_data(e.payload) for e in self.events
                if e.kind == kind and (selector is None or e.selector == selector)]


def make_harness(seed: int = 0, **settings: Any) -> Harness:
    clock = FakeClock()
    bus = EventBus(clock)
    events: list[Event] = []
    bus.subscribe(events.append)
    exchange = FakeExchange(clock)
    engine = RegistrationEngine(exchange, bus, clock, SipConfig(**settings), rng=random.Random(seed))
    life = InstanceLifecycle(engine=engine, registrar=None, bus=bus, clock=clock)  # type: ignore[arg-type]
    return Harness(clock, exchange, engine, events, life)


def make_instance(selector: str = "sel-1", state: AppState = AppState.ACTIVE) -> Instance:
    return Instance(
        selector=selector,
        account=Account(aor=f"sip:{selector}@pbx.example.org", username=selector, password="s3cret"),
        push=PushTarget("fcm", "org.example.phone", f"push-token-{selector}"),
        token_hash=f"hash-{selector}",
        state=state,
    )


def state_of(instance: Instance) -> AppState:
    """The state read afresh (an attribute narrowed by an earlier assert stays narrowed for mypy)."""
    return instance.state


def status_of(instance: Instance) -> RegStatus:
    return instance.registration.status


async def registered(h: Harness, selector: str = "sel-1") -> Instance:
    """An instance the engine holds a confirmed registration for (granted 600 s)."""
    instance = make_instance(selector)
    h.life.take_over(instance)
    await h.step()
    assert instance.state is AppState.PROXIED
    return instance


# ---------------------------------------------------------------------------------------- take over


@pytest.mark.parametrize("seed", SEEDS)
async def test_take_over_registers_then_refreshes_between_50_and_80_percent(seed: int) -> None:
    h = make_harness(seed)
    instance = make_instance()
    h.life.take_over(instance)
    assert instance.state is AppState.INACTIVE
    assert instance.registration.status is RegStatus.REGISTERING

    await h.step()
    assert h.exchange.calls == [Call("sel-1", 600, START)]
    reg = instance.registration
    wall = h.clock.wall()
    assert state_of(instance) is AppState.PROXIED
    assert status_of(instance) is RegStatus.REGISTERED
    assert (reg.last_code, reg.last_reason) == (200, "OK")
    assert reg.expires_at == wall + 600
    assert reg.next_refresh_at is not None and wall + 300 <= reg.next_refresh_at <= wall + 480
    assert reg.registered_at == wall and reg.unregistered_since is None
    assert reg.failure_count == 0 and reg.backoff_until is None
    delay = h.next_due()
    assert delay is not None and reg.next_refresh_at == pytest.approx(wall + delay)

    await h.step(299)
    assert len(h.exchange.calls) == 1, "refreshed before 50 % of the granted expiry"
    await h.step(181)  # t = 480 s = 80 %
    assert len(h.exchange.calls) == 2, "not refreshed by 80 % of the granted expiry"
    refresh = h.exchange.calls[1]
    assert refresh.expires == 600
    assert START + 300 <= refresh.at <= START + 480


async def test_refresh_delay_is_jittered_across_seeds() -> None:
    delays = []
    for seed in range(20):
        h = make_harness(seed)
        await registered(h)
        delay = h.next_due()
        assert delay is not None and 300 <= delay <= 480
        delays.append(delay)
    assert len(set(delays)) == len(delays), "refreshes are not spread out"


async def test_take_over_publishes_state_status_and_registration_events() -> None:
    h = make_harness()
    instance = await registered(h)
    assert h.of_kind("instance.state", "sel-1") == [
        {"state": "inactive", "previous": "active"},
        {"state": "proxied", "previous": "inactive"},
    ]
    assert h.of_kind("registration.status", "sel-1") == [
        {"status": "registering", "previous": "idle"},
        {"status": "registered", "previous": "registering"},
    ]
    [event] = h.of_kind("registration", "sel-1")
    reg = instance.registration
    assert event["result"] == "registered"
    assert (event["code"], event["expires"], event["failure_count"]) == (200, 600, 0)
    assert (event["expires_at"], event["next_refresh_at"]) == (reg.expires_at, reg.next_refresh_at)


def answer(*headers: str) -> Response:
    """A registrar's 200 to REGISTER with these extra header lines."""
    text = ("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\n"
            "Call-ID: c\r\nCSeq: 1 REGISTER\r\n" + "".join(f"{h}\r\n" for h in headers) + "Content-Length: 0\r\n\r\n")
    response = parse_message(text.encode())
    assert isinstance(response, Response)
    return response


async def test_the_registrars_agent_is_kept_from_its_answers_and_bounded() -> None:
    h = make_harness()
    ok_from = RegisterResult(Outcome.REGISTERED, 200, "OK", expires=600, response=answer("Server: kamailio (5.6.3)"))
    h.exchange.script("sel-1", ok_from)
    instance = make_instance()
    assert instance.registration.registrar_agent is None  # nothing known before an answer
    h.life.take_over(instance)
    await h.step()
    assert instance.registration.registrar_agent == "kamailio (5.6.3)"
    # no Server: the User-Agent stands in; a hostile length is cut; a local verdict keeps what we knew
    long_agent = answer("User-Agent: " + "x" * 5000)
    agent_only = RegisterResult(Outcome.REGISTERED, 200, "OK", expires=600, response=long_agent)
    h.exchange.script("sel-1", agent_only, failed(408))
    h.engine.refresh_now(instance)
    await h.step()
    assert instance.registration.registrar_agent == "x" * MAX_AGENT
    h.engine.refresh_now(instance)
    await h.step()
    assert instance.registration.last_code == 408 and instance.registration.registrar_agent == "x" * MAX_AGENT


@pytest.mark.parametrize("seed", SEEDS)
async def test_shorter_granted_expiry_drives_the_refresh(seed: int) -> None:
    h = make_harness(seed)
    h.exchange.script("sel-1", ok(120))
    instance = make_instance()
    h.life.take_over(instance)
    await h.step()
    assert h.exchange.calls[0].expires == 600  # we asked for our default ...
    assert instance.registration.expires_at == h.clock.wall() + 120  # ... the registrar granted 120
    await h.step(59)
    assert len(h.exchange.calls) == 1
    await h.step(37)  # t = 96 s = 80 % of 120
    assert len(h.exchange.calls) == 2
    assert START + 60 <= h.exchange.calls[1].at <= START + 96


async def test_refresh_now_registers_at_once() -> None:
    h = make_harness()
    instance = await registered(h)
    await h.step(10)
    h.engine.refresh_now(instance)
    await h.step()
    assert [c.at for c in h.exchange.calls] == [START, START + 10]


# ---------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [403, 401])
async def test_unauthorized_raises_an_alarm_and_waits_unauthorized_retry(status: int) -> None:
    h = make_harness(unauthorized_retry=3600.0)
    h.exchange.script("sel-1", unauthorized(status))
    instance = make_instance()
    h.life.take_over(instance)
    await h.step()
    reg = instance.registration
    assert reg.status is RegStatus.UNAUTHORIZED
    assert reg.failure_count == 1 and reg.last_code == status
    assert instance.state is AppState.INACTIVE
    assert reg.unregistered_since == h.clock.wall()
    assert reg.backoff_until == h.clock.wall() + 3600
    assert h.of_kind("alarm", "sel-1") == [{"alarm": "unauthorized", "code": status, "reason": reg.last_reason}]
    assert h.of_kind("registration", "sel-1")[-1]["result"] == "unauthorized"

    for _ in range(12):  # 12 × 299.5 s = 3594 s: no hammering
        await h.step(299.5)
        assert len(h.exchange.calls) == 1
    await h.step(5.5)  # t = 3599.5 s
    assert len(h.exchange.calls) == 1
    await h.step(0.5)  # t = 3600 s
    assert [c.at for c in h.exchange.calls] == [START, START + 3600]
    assert status_of(instance) is RegStatus.REGISTERED and reg.failure_count == 0
    assert state_of(instance) is AppState.PROXIED


async def test_retry_after_is_honoured() -> None:
    h = make_harness()
    h.exchange.script("sel-1", failed(503, "Service Unavailable", retry_after=30))
    instance = make_instance()
    h.life.take_over(instance)
    await h.step()
    reg = instance.registration
    assert reg.status is RegStatus.ERROR and reg.last_code == 503
    assert reg.backoff_until == h.clock.wall() + 30
    await h.step(29.5)
    assert len(h.exchange.calls) == 1
    await h.step(0.5)
    assert [c.at for c in h.exchange.calls] == [START, START + 30]
    assert status_of(instance) is RegStatus.REGISTERED


@pytest.mark.parametrize("seed", [3, 11])
async def test_timeouts_back_off_exponentially_with_jitter_up_to_backoff_max(seed: int) -> None:
    base, cap = 2.0, 60.0
    h = make_harness(seed, backoff_base=base, backoff_max=cap)
    instance = await registered(h)
    reg = instance.registration
    expires_wall = reg.expires_at
    assert expires_wall is not None
    failures = 16
    h.exchange.script("sel-1", *[failed(408) for _ in range(failures)])

    delay = h.next_due()  # the regular refresh
    assert delay is not None
    await h.step(delay)
    seen_states = set()
    capped_delays = []
    for n in range(1, failures + 1):
        assert len(h.exchange.calls) == n + 1
        assert reg.failure_count == n
        assert reg.status is RegStatus.ERROR and reg.last_code == 408
        if h.clock.wall() < expires_wall:  # the old registration still holds
            assert instance.state is AppState.PROXIED and reg.expires_at == expires_wall
            assert reg.unregistered_since is None
        else:
            assert instance.state is AppState.INACTIVE and reg.expires_at is None
            assert reg.unregistered_since is not None
        seen_states.add(instance.state)

        delay = h.next_due()
        assert delay is not None
        nominal = min(cap, base * 2 ** (n - 1))
        assert 0.5 * nominal <= delay <= nominal, f"failure {n}: backoff {delay:.3f} s"
        if nominal == cap:
            capped_delays.append(delay)
        assert reg.backoff_until == pytest.approx(h.clock.wall() + delay)
        await h.step(delay - 0.01)
        assert len(h.exchange.calls) == n + 1, f"retried before the backoff after failure {n}"
        await h.step(0.02)

    assert seen_states == {AppState.PROXIED, AppState.INACTIVE}
    assert len(set(capped_delays)) > 1, "capped backoff is not jittered"
    # the retry after the last failure succeeds: everything resets
    assert len(h.exchange.calls) == failures + 2
    assert reg.failure_count == 0 and reg.backoff_until is None
    assert reg.status is RegStatus.REGISTERED and instance.state is AppState.PROXIED
    assert reg.unregistered_since is None


async def test_an_exchange_that_raises_is_a_failure_and_the_engine_keeps_working() -> None:
    h = make_harness(backoff_base=2.0)
    h.exchange.script("bad", RuntimeError("bug in the exchange"))
    bad, good = make_instance("bad"), make_instance("good")
    h.life.take_over(bad)
    h.life.take_over(good)
    await h.step()
    await h.step(0.125)  # the pacing budget starts small
    assert {c.selector for c in h.exchange.calls} == {"bad", "good"}
    assert good.state is AppState.PROXIED
    assert bad.registration.status is RegStatus.ERROR
    assert bad.registration.failure_count == 1 and bad.registration.last_code == 500
    assert bad.state is AppState.INACTIVE

    await h.step(0.75)  # backoff after the first failure is 1–2 s
    assert len(h.exchange.of("bad")) == 1
    await h.step(1.125)
    assert len(h.exchange.of("bad")) == 2
    assert state_of(bad) is AppState.PROXIED and bad.registration.failure_count == 0


# ---------------------------------------------------------------------------------------- pacing


async def test_pacing_spreads_a_mass_take_over_over_the_register_rate() -> None:
    h = make_harness(register_rate=10.0)
    instances = [make_instance(f"sel-{i:03}") for i in range(100)]
    for instance in instances:
        h.life.take_over(instance)

    delay = await h.step()
    first = len(h.exchange.calls)
    assert 1 <= first <= 10, "the first tick exceeds the burst"
    assert delay is not None and delay <= 0.1  # more is waiting for tokens

    counts = {0.0: first}
    elapsed = 0.0
    while elapsed < 12.0:
        await h.step(0.25)
        elapsed += 0.25
        counts[elapsed] = len(h.exchange.calls)
    assert counts[1.0] - first <= 10
    for t in range(12):  # never more than the rate per second window (+1 for the boundary)
        assert counts[t + 1.0] - counts[float(t)] <= 11
    for at, count in counts.items():
        assert count <= 10 + 10 * at
    assert counts[8.0] < 100, "not paced"
    assert counts[10.5] == 100, "pacing is slower than register_rate"
    assert len({c.selector for c in h.exchange.calls}) == 100
    assert all(i.state is AppState.PROXIED for i in instances)


async def test_rescheduling_while_waiting_for_a_token_keeps_the_refresh() -> None:
    h = make_harness(register_rate=1.0)
    first, second = make_instance("a"), make_instance("b")
    h.life.take_over(first)
    h.life.take_over(second)
    await h.step()
    assert [c.selector for c in h.exchange.calls] == ["a"]  # "b" waits for a token
    h.life.take_over(second)  # the app reports "inactive" again meanwhile
    await h.step(1.0)
    assert [c.selector for c in h.exchange.calls] == ["a", "b"]
    assert second.state is AppState.PROXIED
    await h.run_for(600, step=4.0)
    refreshes = h.exchange.of("b")[1:]
    assert refreshes, "the refresh of b was lost"
    assert START + 1 + 300 <= refreshes[0].at <= START + 1 + 480 + 4


async def test_a_flood_of_re_registrations_and_state_flips_stays_within_register_rate_transactions() -> None:
    """One client flipping its instances between active and inactive and re-enrolling them with new
    credentials as fast as it can (20 times a second each): every attempt it triggers is paced, and
    a challenged REGISTER and its retry count as two transactions."""
    rate = 10.0
    h = make_harness(register_rate=rate)
    h.exchange.transactions = 2
    instances = [make_instance(f"sel-{n}") for n in range(4)]
    for n in range(200):  # 10 s
        for instance in instances:
            if n % 2:
                h.life.hand_back(instance, None)
            else:
                h.life.take_over(instance)
                h.life.re_register(instance)
        await h.step(0.05)
    times = [c.at - START for c in h.exchange.calls]
    assert any(c.expires == 0 for c in h.exchange.calls) and any(c.expires == 600 for c in h.exchange.calls)
    # the full bucket's second is spent in the first second; after it, any one-second window holds
    # at most register_rate transactions, plus the one exchange the estimate may fall short by
    for start in [n * 0.05 for n in range(20, 180)]:
        sent = 2 * sum(1 for t in times if start <= t < start + 1.0)
        assert sent <= rate + 2, f"{sent} transactions in the second from {start:.2f} s"
    assert 2 * len(times) <= rate * 11 + 2


async def test_a_challenged_retry_is_charged_to_the_bucket() -> None:
    h = make_harness(register_rate=10.0)
    h.exchange.transactions = 3  # stale nonce: three REGISTERs in one exchange
    instances = [make_instance(f"sel-{n:02}") for n in range(40)]
    for instance in instances:
        h.life.take_over(instance)
    await h.run_for(4.0, step=0.125)
    # 10 tokens to start with plus 10 a second, 3 each: at most 17 exchanges in 4 s
    assert 3 * len(h.exchange.calls) <= 10 + 10 * 4.0 + 3


async def test_operator_re_register_and_removals_wait_for_a_token() -> None:
    h = make_harness(register_rate=1.0)
    instance = await registered(h)  # spends the one token
    h.life.re_register(instance)
    await h.step(0.25)
    assert len(h.exchange.calls) == 1, "re-registration was not paced"
    await h.step(1.0)
    assert len(h.exchange.calls) == 2
    removal = h.life.hand_back(instance, None)
    await h.step(0.25)
    assert not removal.done(), "the hand-back's removal was not paced"
    await h.step(1.0)
    assert removal.done() and h.exchange.calls[-1].expires == 0


# ---------------------------------------------------------------------------------------- hand back


async def test_hand_back_removes_our_binding_and_resolves_with_the_result() -> None:
    h = make_harness()
    instance = await registered(h)
    removed = ok(0)
    h.exchange.script("sel-1", removed)
    future = h.life.hand_back(instance, None)
    assert instance.state is AppState.ACTIVE
    assert not future.done()

    await h.step(1)  # a fresh pacing token
    assert h.exchange.calls[-1] == Call("sel-1", 0, START + 1)
    assert future.done() and future.result() is removed
    reg = instance.registration
    assert reg.status is RegStatus.IDLE and instance.state is AppState.ACTIVE
    assert reg.expires_at is None and reg.next_refresh_at is None
    assert h.of_kind("registration", "sel-1")[-1]["result"] == "unregistered"
    assert [e["status"] for e in h.of_kind("registration.status")][-2:] == ["unregistering", "idle"]

    await h.run_for(1000, step=50.0)  # no refresh of a binding we gave back
    assert len(h.exchange.calls) == 2


async def test_hand_back_of_an_instance_never_registered_resolves_at_once() -> None:
    h = make_harness()
    instance = make_instance()
    future = h.life.hand_back(instance, None)
    assert future.done() and future.result() is None
    assert instance.state is AppState.ACTIVE and instance.registration.status is RegStatus.IDLE
    await h.step(10)
    assert h.exchange.calls == []


async def test_hand_back_while_a_register_is_in_flight_unregisters_after_it() -> None:
    h = make_harness()
    gate = asyncio.Event()
    h.exchange.script("sel-1", Gate(gate, ok(600)))
    instance = make_instance()
    h.life.take_over(instance)
    h.engine.tick()
    await asyncio.sleep(0)  # the REGISTER is now waiting for the registrar
    assert len(h.exchange.calls) == 1

    future = h.life.hand_back(instance, None)
    assert instance.state is AppState.ACTIVE
    h.clock.advance(0.5)
    h.engine.tick()  # nothing new starts while the REGISTER is in flight
    await asyncio.sleep(0)
    assert len(h.exchange.calls) == 1 and not future.done()

    gate.set()
    await h.engine.drain()  # the REGISTER succeeded: we now hold a binding again
    assert not future.done()
    await h.step(1)
    assert [c.expires for c in h.exchange.calls] == [600, 0]
    assert future.done()
    result = future.result()
    assert result is not None and result.ok and result.expires == 0
    assert instance.registration.status is RegStatus.IDLE
    assert instance.state is AppState.ACTIVE, "the racing REGISTER overwrote the app's state"
    await h.run_for(1000, step=50.0)
    assert len(h.exchange.calls) == 2


async def test_hand_back_while_a_first_register_fails_sends_nothing_more() -> None:
    h = make_harness()
    gate = asyncio.Event()
    h.exchange.script("sel-1", Gate(gate, failed(503)))
    instance = make_instance()
    h.life.take_over(instance)
    h.engine.tick()
    await asyncio.sleep(0)
    future = h.life.hand_back(instance, None)
    gate.set()
    await h.engine.drain()
    assert future.done()  # we never held a binding: nothing to remove
    assert instance.state is AppState.ACTIVE and instance.registration.status is RegStatus.IDLE
    await h.run_for(1000, step=50.0)
    assert [c.expires for c in h.exchange.calls] == [600]


async def test_hand_back_after_a_timed_out_register_removes_what_it_may_have_bound() -> None:
    h = make_harness()
    gate = asyncio.Event()
    h.exchange.script("sel-1", Gate(gate, failed(408)))
    instance = make_instance()
    h.life.take_over(instance)
    h.engine.tick()
    await asyncio.sleep(0)
    future = h.life.hand_back(instance, None)
    gate.set()
    await h.engine.drain()
    await h.step(1)
    assert [c.expires for c in h.exchange.calls] == [600, 0]  # the 408'd REGISTER may have landed
    assert future.done()
    assert instance.state is AppState.ACTIVE and instance.registration.status is RegStatus.IDLE


async def test_hand_back_while_a_refresh_fails_still_removes_the_old_binding() -> None:
    h = make_harness()
    instance = await registered(h)
    gate = asyncio.Event()
    h.exchange.script("sel-1", Gate(gate, failed(503, "Service Unavailable")))
    delay = h.next_due()
    assert delay is not None
    h.clock.advance(delay)
    h.engine.tick()
    await asyncio.sleep(0)
    future = h.life.hand_back(instance, None)
    gate.set()
    await h.engine.drain()
    assert not future.done()
    await h.step(1)
    assert [c.expires for c in h.exchange.calls] == [600, 600, 0]
    assert future.done()
    assert instance.state is AppState.ACTIVE and instance.registration.status is RegStatus.IDLE


async def test_take_over_after_hand_back_registers_again() -> None:
    h = make_harness()
    instance = await registered(h)
    h.life.hand_back(instance, None)
    await h.step(1)
    h.life.take_over(instance)
    await h.step(5)
    assert [c.expires for c in h.exchange.calls] == [600, 0, 600]
    assert instance.state is AppState.PROXIED


# ---------------------------------------------------------------------------------------- remove, flows, stop


async def test_remove_unregisters_then_forgets_the_instance() -> None:
    h = make_harness()
    first = await registered(h, "a")
    await h.step(1)
    await registered(h, "b")
    assert h.engine.entries() == 2

    future = h.engine.remove(first)
    await h.step()
    assert h.exchange.calls[-1] == Call("a", 0, START + 1)
    assert future.done() and future.result() is not None
    assert h.engine.entries() == 1
    await h.run_for(1000, step=50.0)
    assert all(c.selector == "b" for c in h.exchange.calls[3:])  # "a" is never refreshed again

    never = h.engine.remove(make_instance("c"))
    assert never.done() and never.result() is None
    assert h.engine.entries() == 1


@pytest.mark.parametrize("seed", SEEDS)
async def test_flow_lost_re_registers_within_two_seconds(seed: int) -> None:
    h = make_harness(seed)
    instance = await registered(h)
    await h.step(1)
    handed_back = await registered(h, "other")
    h.life.hand_back(handed_back, None)
    await h.step(9)
    calls = len(h.exchange.calls)

    h.engine.flow_lost(["sel-1", "other", "unknown"])
    delay = h.next_due()
    assert delay is not None and delay <= 2.0
    await h.step(2.0)
    assert len(h.exchange.calls) == calls + 1
    assert h.exchange.calls[-1].selector == "sel-1" and h.exchange.calls[-1].expires == 600
    assert START + 10 <= h.exchange.calls[-1].at <= START + 12
    assert instance.state is AppState.PROXIED


async def test_instances_on_one_flow_share_its_name_and_the_reason_phrase() -> None:
    """What every registration remembers (the flow, "OK") is one string for all of them, not a copy
    per instance: at 100k instances the copies cost megabytes."""
    h = make_harness()
    flow = Flow("tcp", ("127.0.0.1", 5070), ("192.0.2.1", 5060), True, lambda _data: None, lambda: None)
    instances = [make_instance(f"sel-{n}") for n in range(3)]
    for instance in instances:
        reason = "".join(["O", "K"])  # a new string each time, as a parsed response has
        h.exchange.script(instance.selector, RegisterResult(Outcome.REGISTERED, 200, reason, 600, flow=flow))
        h.life.take_over(instance)
    await h.run_for(3.0, step=0.5)
    regs = [instance.registration for instance in instances]
    assert all(r.status is RegStatus.REGISTERED and r.flow == str(flow) and r.last_reason == "OK" for r in regs)
    assert regs[0].flow is regs[1].flow is regs[2].flow
    assert regs[0].last_reason is regs[1].last_reason is regs[2].last_reason


async def test_stop_with_unregister_removes_every_binding_we_hold() -> None:
    h = make_harness()
    a, b, c = make_instance("a"), make_instance("b"), make_instance("c")
    for instance in (a, b, c):
        h.life.take_over(instance)
    await h.run_for(1.0)
    h.life.hand_back(c, None)
    await h.run_for(1.0)
    assert [(x.selector, x.expires) for x in h.exchange.calls] == [("a", 600), ("b", 600), ("c", 600), ("c", 0)]

    h.engine.start()
    await asyncio.wait_for(h.engine.stop(unregister=True), timeout=3.0)
    assert sorted((x.selector, x.expires) for x in h.exchange.calls[4:]) == [("a", 0), ("b", 0)]
    assert a.registration.status is RegStatus.IDLE and b.registration.status is RegStatus.IDLE
    assert h.engine.entries() == 1  # only the handed-back "c", which holds nothing


async def test_stop_without_unregister_leaves_bindings_alone() -> None:
    h = make_harness()
    await registered(h)
    h.engine.start()
    await asyncio.wait_for(h.engine.stop(unregister=False), timeout=3.0)
    assert len(h.exchange.calls) == 1


async def test_refreshes_and_hand_backs_are_not_held_back_by_pacing() -> None:
    """Pacing protects the PBX from start-up bursts; a confirmed registration's refresh must still be
    on time (issue: no refresh late by more than 1 s) and a hand-back must not queue behind a burst
    (it waits for the next token only)."""
    h = make_harness(register_rate=1.0)
    instances = [make_instance(f"sel-{n}") for n in range(5)]
    for instance in instances:
        h.life.take_over(instance)
    await h.run_for(6.0, step=0.5)  # paced: one new registration per second
    assert len(h.exchange.calls) == 5
    refresh_due = {c.selector: c.at for c in h.exchange.calls}
    burst = [make_instance(f"new-{n}") for n in range(700)]  # still draining when refreshes fall due
    for instance in burst:
        h.life.take_over(instance)  # a burst of take-overs is now queued behind the bucket
    future = h.engine.hand_back(instances[0])
    await h.step(0.0)
    assert future.done(), "the hand-back waited for a pacing token"
    await h.run_for(600.0, step=0.5)
    refreshes = [c for c in h.exchange.calls if c.selector.startswith("sel-") and c.expires == 600
                 and c.at > refresh_due[c.selector]]
    assert {c.selector for c in refreshes} >= {f"sel-{n}" for n in range(1, 5)}
    for call in refreshes:
        elapsed = call.at - refresh_due[call.selector]
        assert 300.0 <= elapsed <= 480.0 + 0.5, f"refresh of {call.selector} after {elapsed} s"


async def test_stop_is_never_lost_when_it_races_a_wake_up() -> None:
    """Python 3.11's wait_for could swallow a cancellation arriving together with the wake-up
    (gh-86296), leaving the runner alive after stop(); the engine must stop every time."""
    for seed in range(50):
        h = make_harness(seed=seed)
        h.engine.start()
        await asyncio.sleep(0)
        h.life.take_over(make_instance(f"sel-{seed}"))  # sets the wake event in this iteration
        await asyncio.wait_for(h.engine.stop(unregister=False), timeout=2.0)
        assert h.engine._runner is None


# ---------------------------------------------------------------------------------------- registrar target down / back


async def test_a_dead_target_is_probed_and_everyone_waiting_is_retried_at_once_when_it_is_back() -> None:
    h = make_harness(register_rate=10.0)
    target = "udp:192.0.2.10:5060"
    pbx_answers = True

    async def exchange(instance: Instance, expires: int) -> RegisterResult:
        result = await h.exchange(instance, expires) if pbx_answers else failed()
        if not pbx_answers:
            h.exchange.calls.append(Call(instance.selector, expires, h.clock.monotonic()))
        result.target = target
        return result

    h.engine.exchange = exchange
    instances = [make_instance(f"sel-{n}") for n in range(30)]
    for instance in instances:
        h.life.take_over(instance)
    await h.run_for(4.0)
    assert all(i.state is AppState.PROXIED and i.registration.target == target for i in instances)

    pbx_answers = False
    h.engine.bus.publish(None, HealthChanged(HealthSubject.PBX, target, HealthState.DOWN, HealthState.UP))
    assert all(state_of(i) is AppState.INACTIVE and status_of(i) is RegStatus.ERROR for i in instances)
    before = len(h.exchange.calls)
    await h.run_for(60.0, step=0.5)
    probes = h.exchange.calls[before:]
    # a REGISTER at least every interval; no more than the probes and the probed one's own backoff
    starts = [h.clock.monotonic() - 60.0] + [c.at for c in probes]
    assert all(b - a <= PROBE_INTERVAL for a, b in itertools.pairwise(starts))
    assert 60 / PROBE_INTERVAL <= len(probes) <= 2 * 60 / PROBE_INTERVAL

    pbx_answers = True
    h.engine.bus.publish(None, HealthChanged(HealthSubject.PBX, target, HealthState.UP, HealthState.DOWN))
    back = h.clock.monotonic()
    await h.run_for(30 / 10.0 + 1.0)
    assert all(state_of(i) is AppState.PROXIED for i in instances)
    retried = [c.at - back for c in h.exchange.calls if c.at > back]  # (the last probe ran at ``back``)
    assert len(retried) == 30 and max(retried) <= 30 / 10.0  # paced, not after each one's backoff


async def test_a_failure_on_a_dead_target_ends_the_binding_at_once() -> None:
    h = make_harness()
    target = "udp:192.0.2.10:5060"
    instance = await registered(h)
    instance.registration.target = target
    h.engine.bus.publish(None, HealthChanged(HealthSubject.PBX, "udp:192.0.2.99:5060", HealthState.DOWN,
                                             HealthState.UP))
    assert instance.state is AppState.PROXIED  # another target's trouble
    result = failed()
    result.target = target
    h.exchange.script("sel-1", result)
    h.engine.refresh_now(instance)
    await h.step()
    assert state_of(instance) is AppState.PROXIED  # one timeout on a target not known down: still bound
    h.engine.bus.publish(None, HealthChanged(HealthSubject.PBX, target, HealthState.DOWN, HealthState.DEGRADED))
    assert state_of(instance) is AppState.INACTIVE and instance.registration.expires_at is None
