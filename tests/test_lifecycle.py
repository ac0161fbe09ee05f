"""The lifecycle owner: the only writer of ``state``/``disabled``, one ``instance.state`` event per change."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from contract.codec import payload_data
from sipis.clock import FakeClock
from sipis.engine import RegistrationEngine
from sipis.events import Event, EventBus
from sipis.instance import Account, AppState, Instance, PushTarget
from sipis.lifecycle import InstanceLifecycle, Unusable
from sipis.sip.register import Outcome, RegisterResult

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "sipis" / "lifecycle.py"
#: ``.state`` assignments in the core that are not an instance's: the operator API's index entries
#: (an object setting its own ``self.state`` and the SIP layer's transactions are skipped as well)
NOT_INSTANCES = {("operator_api", "entry.state"), ("alarms", "record.state"), ("health", "health.state")}


def test_only_the_owner_assigns_state_or_disabled() -> None:
    writers = []
    for path in sorted((ROOT / "sipis").rglob("*.py")):
        if path == OWNER or "sip" in path.relative_to(ROOT / "sipis").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    targets.extend(target.elts if isinstance(target, ast.Tuple) else [target])
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets.append(node.target)
            for target in targets:
                if not isinstance(target, ast.Attribute) or target.attr not in ("state", "disabled"):
                    continue
                expression, where = ast.unparse(target), path.relative_to(ROOT)
                if expression.startswith("self.") or any(
                        module in where.parts or module == where.stem
                        for module, allowed in NOT_INSTANCES if allowed == expression):
                    continue
                writers.append(f"{where}:{node.lineno} {expression}")
    assert writers == []


class Registrar:
    """Grants every REGISTER (or fails while ``failing``)."""

    def __init__(self) -> None:
        self.failing = False
        self.forgotten: list[str] = []

    async def __call__(self, instance: Instance, expires: int) -> RegisterResult:
        if self.failing and expires:
            return RegisterResult(Outcome.FAILED, 503, "Service Unavailable")
        return RegisterResult(Outcome.REGISTERED, 200, "OK", expires=expires)

    def forget(self, selector: str) -> None:
        self.forgotten.append(selector)

    def prepare(self, instance: Instance) -> None:
        pass


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.bus = EventBus(self.clock)
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.registrar = Registrar()
        self.engine = RegistrationEngine(self.registrar, self.bus, self.clock, rng=random.Random(1))
        self.life = InstanceLifecycle(engine=self.engine, registrar=self.registrar,  # type: ignore[arg-type]
                                      bus=self.bus, clock=self.clock)

    async def settle(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.engine.tick()
        await self.engine.drain()

    def states(self) -> list[dict[str, object]]:
        return [payload_data(e.payload) for e in self.events if e.kind == "instance.state"]


def make_instance(state: AppState = AppState.ACTIVE) -> Instance:
    return Instance("sel-1", Account("sip:a@pbx", "a", "pw"), PushTarget("m", "app", "tok"), "hash", state=state)


@pytest.fixture
def world() -> World:
    return World()


async def test_take_over_and_registration_each_publish_one_event(world: World) -> None:
    instance = make_instance()
    world.life.add(instance)
    world.life.take_over(instance)
    assert world.states() == [{"state": "inactive", "previous": "active"}]
    await world.settle()
    assert world.states()[1:] == [{"state": "proxied", "previous": "inactive"}]
    world.life.take_over(instance, reason="again")  # no change, no event
    assert len(world.states()) == 2


async def test_lapsed_registration_goes_back_to_inactive(world: World) -> None:
    instance = make_instance()
    world.life.take_over(instance)
    await world.settle()
    world.registrar.failing = True
    await world.settle(3600)  # refreshes fail until the granted 600 s are gone
    assert instance.state is AppState.INACTIVE
    assert world.states()[-1] == {"state": "inactive", "previous": "proxied"}


async def test_hand_back_publishes_one_event_and_tells_the_listeners(world: World) -> None:
    instance = make_instance()
    heard: list[tuple[str, str | None]] = []
    world.life.on_hand_back(lambda i, removal, contact: heard.append((i.selector, contact)))
    world.life.take_over(instance)
    await world.settle()
    removal = world.life.hand_back(instance, "sip:a@10.0.0.1", reason="app active")
    assert world.states()[-1] == {"state": "active", "previous": "proxied", "reason": "app active"}
    assert heard == [("sel-1", "sip:a@10.0.0.1")]
    await world.settle()
    assert removal.done()


async def test_retire_goes_off_once_and_delete_forgets(world: World) -> None:
    instance = make_instance()
    world.life.add(instance)
    await world.life.retire(instance, reason="aged", delete=False)
    assert world.states() == [{"state": "off", "previous": "active", "reason": "aged"}]
    assert instance.account.password is None and not world.life.may_act(instance)
    with pytest.raises(Unusable):
        world.life.take_over(instance)
    other = Instance("sel-2", Account("sip:b@pbx", "b", "pw"), PushTarget("m", "app", "tok"), "h")
    world.life.add(other)
    await world.life.retire(other, reason="deleted", delete=True)
    assert world.life.get("sel-2") is None
    assert [e.kind for e in world.events if e.selector == "sel-2"] == ["instance.deleted"]


async def test_disable_then_reactivate(world: World) -> None:
    instance = make_instance(AppState.INACTIVE)
    world.life.add(instance)
    await world.life.disable(instance, reason="disabled by root")
    assert instance.disabled and instance.state is AppState.OFF
    assert world.states() == [{"state": "off", "previous": "inactive", "reason": "disabled by root"}]
    instance.account.password = "new"  # what a new enrolment brings
    world.life.reactivate(instance)
    assert not instance.disabled and instance.state is AppState.ACTIVE
    assert world.states()[1:] == [{"state": "active", "previous": "off", "reason": "enrolled again"}]
    world.life.reactivate(instance)  # nothing to do
    assert len(world.states()) == 2


async def test_resume_after_restart_marks_a_lapsed_registration_inactive(world: World) -> None:
    instance = make_instance(AppState.PROXIED)
    instance.registration.expires_at = world.clock.wall() - 1
    world.life.resume(instance)
    assert world.states() == [{"state": "inactive", "previous": "proxied",
                               "reason": "registration lapsed during the restart"}]
    await world.settle()
    assert instance.state is AppState.PROXIED


async def test_may_act_is_asked_before_a_register_starts(world: World) -> None:
    instance = make_instance()
    world.life.take_over(instance)
    instance.account.password = None  # e.g. undecryptable after a restart
    await world.settle()
    assert world.engine.attempts == 0 and instance.state is AppState.INACTIVE
