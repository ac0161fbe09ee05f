"""Simulated softphone apps: real HTTPS to the app API, real SIP to the lab PBX, pushes from the lab mediator.

A :class:`LabPhone` behaves like a mobile softphone with a SIPIS account:

1. **Enrols** at the app API (``POST /v1/instances`` with the enrolment token; the TLS certificate is
   checked against the core's generated one) with its SIP account and push token, and attaches its
   token to the :class:`~lab.mediator.LabMediator` so accepted pushes reach it. Its push goes
   through the Acrobits mediator by default; :attr:`PhoneProfile.push_type` ``fcm`` makes it an
   Android app (an FCM-style registration token, ``[push.fcm]``) and ``apns`` an iOS app (a
   device token plus a PushKit token for calls, ``[push.apns]``).
2. **Foreground** (``awake``): registers *itself* at the lab PBX with its own SIP endpoint (UDP on a
   free loopback port, Contact ``sip:<user>-app@127.0.0.1:<port>``), then reports
   ``PUT /v1/instances/{selector}/state {"state": "active", "contact": ...}``; refreshes its own
   registration while it stays awake.
3. **Background** (``asleep``): reports ``inactive`` (the SIPIS registers on its behalf), then
   removes its own binding (REGISTER ``expires=0``). Foreground and background alternate on a
   randomised schedule (:attr:`PhoneProfile.foreground`, :attr:`PhoneProfile.background`).
4. A call **push** (``NotifyIncomingCall``) while asleep wakes it after
   :attr:`PhoneProfile.wake_delay` (lognormal, median 1.5 s by default): it reports progress
   (``POST .../calls/{push_id}/progress``), registers itself, reports ``active`` with its contact —
   the SIPIS releases the held INVITE with 302 and the PBX rings the phone directly. A missed-call
   push for the only pending call during the wake delay sends it back to sleep. A push while awake
   is answered with progress + ``active`` at once.
5. **Calls**: ``180 Ringing``, then after :attr:`PhoneProfile.answer_delay` either ``200`` with SDP
   (the ACK and the caller's BYE are handled) or, with :attr:`PhoneProfile.reject_rate`, ``486`` /
   ``603``. CANCEL stops the ringing (the endpoint answers 487).

Profiles for the awkward cases: ``never_wakes`` (pushes arrive, nothing happens: the core's T1
ends the call), ``dead_token`` (the mediator answers code 404, FCM ``UNREGISTERED``, APNs ``410``:
device unreachable), and ``stale_password`` (the enrolment carries an outdated SIP password: the
SIPIS cannot register for it, ageing turns the instance ``off``; the app notices the 409 on its
next state report and enrols again with the right password).

:class:`PhoneFleet` starts N phones with one seeded RNG per phone (``random.Random(f"{seed}:{i}")``)
and assigns the awkward profiles, and the FCM and APNs apps, to exact, seeded-shuffled shares of
the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from lab.kamailio import LOAD_PASSWORD
from lab.mediator import LAB_APP_ID, PROVIDER_NAMES, Distribution, LabMediator, LabPush
from lab.pbx import LabPbx
from sipis.sip.digest import Credentials
from sipis.sip.endpoint import EndpointSettings, IncomingRequest, SipEndpoint
from sipis.sip.message import Request, SipParseError, SipURI
from sipis.sip.register import Binding, register
from sipis.sip.transport import Flow, ListenSpec, TransportError

log = logging.getLogger(__name__)

APP_ID = LAB_APP_ID  # also the bundle id (APNs topic) the lab APNs accepts
SDP_ANSWER = (b"v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
              b"m=audio 40002 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
#: a phone in a call stays awake at most this long past its planned foreground time
MAX_CALL_EXTENSION = 120.0


@dataclass(frozen=True)
class PhoneProfile:
    """How one simulated app behaves. Durations are :class:`~lab.mediator.Distribution` samples."""

    wake_delay: Distribution = field(default_factory=lambda: Distribution.lognormal(1.5, 0.5, cap=30.0))
    foreground: Distribution = field(default_factory=lambda: Distribution.exponential(8.0, cap=60.0))
    background: Distribution = field(default_factory=lambda: Distribution.exponential(60.0, cap=600.0))
    #: time awake right after enrolment, before the first trip to the background
    first_foreground: Distribution = field(default_factory=lambda: Distribution.uniform(0.2, 2.0))
    answer_delay: Distribution = field(default_factory=lambda: Distribution.uniform(0.3, 2.0))
    reject_rate: float = 0.15
    never_wakes: bool = False
    dead_token: bool = False
    stale_password: bool = False
    register_expires: int = 120
    #: the core's ``[push.NAME]`` for this app, and that provider's type (the shape of the tokens;
    #: an ``apns`` app also enrols a PushKit token, which the core uses for call pushes)
    provider: str = "mediator"
    push_type: str = "acrobits"

    @property
    def kind(self) -> str:
        if self.never_wakes:
            return "never-wakes"
        if self.dead_token:
            return "dead-token"
        if self.stale_password:
            return "stale-password"
        return "normal"


@dataclass
class _Dialog:
    call_id: str
    incoming: IncomingRequest
    state: str = "ringing"  # ringing → answered → confirmed (ACK) → ended
    timer: asyncio.TimerHandle | None = None


class LabPhone:
    """One simulated app (see the module docstring). ``await start()`` enrols it and starts its life."""

    def __init__(self, user: str, password: str, *, pbx: LabPbx, api: httpx.AsyncClient, enroll_token: str,
                 mediator: LabMediator, profile: PhoneProfile | None = None, rng: random.Random | None = None,
                 name: str | None = None) -> None:
        self.user = user
        self.password = password
        self.pbx = pbx
        self.api = api
        self.enroll_token = enroll_token
        self.mediator = mediator
        self.profile = profile or PhoneProfile()
        self.rng = rng or random.Random()
        self.name = name or user
        self.token = _push_token(self.profile.push_type)
        self.voip_token = secrets.token_hex(32) if self.profile.push_type == "apns" else None
        self.selector: str | None = None
        self.bearer: str | None = None
        #: new → awake / asleep / waking → stopped
        self.state = "new"
        self.stats: Counter[str] = Counter()
        self.pushes: list[LabPush] = []
        self.endpoint = SipEndpoint(EndpointSettings(listen=[ListenSpec("udp", pbx.host, 0)],
                                                        user_agent="sipis-lab-phone"))
        self.endpoint.unmatched_ack = self._on_ack  # the ACK for our 2xx
        self.binding: Binding | None = None
        self.contact: str | None = None
        self.dialogs: dict[str, _Dialog] = {}
        self._pending_calls: dict[str, str] = {}  # call_id → push_id of calls we are waking for
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while no call is ringing or up
        self._idle.set()
        self._life: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._password_fixed = not self.profile.stale_password
        if self.profile.dead_token:
            for token in self.tokens:
                mediator.kill(token)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, live: bool = True) -> None:
        """Open the SIP endpoint and enrol; with ``live`` also start the foreground/background life."""
        await self.endpoint.start()
        self.endpoint.handlers["INVITE"] = self._on_invite
        self.endpoint.handlers["BYE"] = self._on_bye
        for token in self.tokens:
            self.mediator.attach(token, self._on_push)
        await self.enrol()
        if live:
            self._life = asyncio.create_task(self._run(), name=f"phone-{self.user}")

    async def stop(self) -> None:
        self.state = "stopped"
        for token in self.tokens:
            self.mediator.detach(token)
        tasks = [t for t in (self._life, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for dialog in self.dialogs.values():
            if dialog.timer is not None:
                dialog.timer.cancel()
        self.dialogs.clear()
        await self.endpoint.close()

    @property
    def kind(self) -> str:
        return self.profile.kind

    @property
    def tokens(self) -> list[str]:
        """Every push token this app has (the PushKit token too, on iOS)."""
        return [self.token] if self.voip_token is None else [self.token, self.voip_token]

    # ------------------------------------------------------------------ app API

    def _account(self) -> dict[str, Any]:
        password = self.password if self._password_fixed else f"{self.password}-old"
        return {"aor": self.pbx.aor(self.user), "username": self.user, "password": password,
                "registrar": f"sip:{self.pbx.host}:{self.pbx.tcp_port or self.pbx.udp_port};transport=tcp",
                "display_name": self.name}

    async def enrol(self) -> None:
        """``POST /v1/instances`` (again with our selector after the instance went off)."""
        push: dict[str, Any] = {"provider": self.profile.provider, "app_id": APP_ID, "token": self.token}
        if self.voip_token is not None:
            push["voip_token"] = self.voip_token
        body: dict[str, Any] = {"account": self._account(), "push": push}
        # Re-enrolling our selector takes our own token; the enrolment token only creates.
        bearer = self.enroll_token
        if self.selector is not None and self.bearer is not None:
            body["selector"], bearer = self.selector, self.bearer
        response = await self.api.post("/v1/instances", json=body,
                                       headers={"Authorization": f"Bearer {bearer}"})
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{self.user}: enrolment failed: {response.status_code} {response.text}")
        answer = response.json()
        self.selector, self.bearer = answer["selector"], answer["token"]
        self.stats["enrolments"] += 1

    async def _call_api(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response | None:
        assert self.selector is not None
        try:
            response = await self.api.request(method, f"/v1/instances/{self.selector}{path}", json=body,
                                              headers={"Authorization": f"Bearer {self.bearer}"})
        except httpx.HTTPError as exc:
            self.stats["api_errors"] += 1
            log.info("%s: %s %s failed: %s", self.user, method, path, exc)
            return None
        if response.status_code >= 400:
            self.stats[f"api_{response.status_code}"] += 1
        return response

    async def report_state(self, state: str) -> bool:
        body: dict[str, Any] = {"state": state}
        if state == "active" and self.contact is not None:
            body["contact"] = self.contact
        response = await self._call_api("PUT", "/state", body)
        if response is not None and response.status_code == 409:
            # the instance went off (ageing): the app enrols again, now with its current password
            self._password_fixed = True
            try:
                await self.enrol()
            except (RuntimeError, httpx.HTTPError) as exc:
                log.info("%s: re-enrolment failed: %s", self.user, exc)
                return False
            self.stats["reenrolled"] += 1
            response = await self._call_api("PUT", "/state", body)
        ok = response is not None and response.status_code == 200
        if ok:
            self.stats[f"reported_{state}"] += 1
        return ok

    async def report_progress(self, push_id: str) -> bool:
        response = await self._call_api("POST", f"/calls/{push_id}/progress")
        ok = response is not None and response.status_code == 200
        self.stats["progress_reported" if ok else "progress_too_late"] += 1
        return ok

    # ------------------------------------------------------------------ own registration at the PBX

    async def _flow(self) -> Flow:
        return await self.endpoint.transport.flow_to("udp", self.pbx.host, self.pbx.udp_port)

    async def register_self(self) -> bool:
        if self.binding is None:
            self.binding = Binding(aor=SipURI.parse(self.pbx.aor(self.user)),
                                   registrar=SipURI.parse(self.pbx.uri("udp")),
                                   credentials=Credentials(self.user, self.password), contact_user=f"{self.user}-app",
                                   user_agent="sipis-lab-phone")
        try:
            result = await register(self.endpoint, self.binding, await self._flow(), self.profile.register_expires)
        except TransportError as exc:
            self.stats["register_failed"] += 1
            log.info("%s: REGISTER failed: %s", self.user, exc)
            return False
        if not result.ok:
            self.stats["register_failed"] += 1
            log.info("%s: REGISTER %d %s", self.user, result.status, result.detail)
            return False
        self.contact = self.binding.contact_uri
        self.stats["registered"] += 1
        return True

    async def unregister_self(self) -> None:
        if self.binding is None or self.binding.contact_uri is None:
            return
        with contextlib.suppress(TransportError):
            result = await register(self.endpoint, self.binding, await self._flow(), 0)
            self.stats["unregistered" if result.ok else "unregister_failed"] += 1

    # ------------------------------------------------------------------ life: foreground ⇄ background

    async def _run(self) -> None:
        try:
            await self.come_to_foreground()
            await self._stay_awake(self.profile.first_foreground.sample(self.rng))
            while True:
                await self.go_to_background()
                await self._sleep()
                await self.come_to_foreground()
                await self._stay_awake(self.profile.foreground.sample(self.rng))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("phone %s crashed", self.user)
            self.stats["crashed"] += 1

    async def come_to_foreground(self) -> None:
        """Register ourselves, then tell the SIPIS we are back (it drops its binding, releases calls)."""
        self.state = "awake"  # from here on an INVITE on our new binding is answered
        await self.register_self()
        await self.report_state("active")
        self._pending_calls.clear()
        self._wake.clear()

    async def go_to_background(self) -> None:
        """Tell the SIPIS to take over first, then remove our own binding (no gap)."""
        self.state = "asleep"
        await self.report_state("inactive")
        await self.unregister_self()
        self.stats["slept"] += 1

    async def _stay_awake(self, duration: float) -> None:
        """Awake for ``duration``, longer while a call rings or is up; refreshes our registration."""
        loop = asyncio.get_running_loop()
        until = loop.time() + duration
        hard_stop = until + MAX_CALL_EXTENSION
        refresh_every = self.profile.register_expires * 0.6
        next_refresh = loop.time() + refresh_every
        while True:
            now = loop.time()
            if now >= until and (self._idle.is_set() or now >= hard_stop):
                return
            if now >= next_refresh:
                await self.register_self()
                next_refresh = loop.time() + refresh_every
                continue
            if now < until:
                await asyncio.sleep(min(until, next_refresh) - now)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), min(hard_stop, next_refresh) - now)

    async def _sleep(self) -> None:
        """Until the user opens the app (background time) or a call push wakes it (plus wake delay)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.profile.background.sample(self.rng)
        while True:
            remaining = until - loop.time()
            if remaining <= 0:
                self.stats["user_opened"] += 1
                return
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                continue
            self.state = "waking"
            await asyncio.sleep(self.profile.wake_delay.sample(self.rng))
            self._wake.clear()
            if not self._pending_calls:  # the caller gave up meanwhile: only a missed-call notice
                self.stats["wake_aborted"] += 1
                self.state = "asleep"
                continue
            self.stats["woken"] += 1
            for push_id in list(self._pending_calls.values()):
                await self.report_progress(push_id)
            return

    # ------------------------------------------------------------------ pushes

    def _on_push(self, push: LabPush) -> None:
        self.pushes.append(push)
        self.stats["pushes"] += 1
        self.stats[f"pushes_via_{push.provider}"] += 1
        if push.is_missed:
            self.stats["missed_call_pushes"] += 1
            if push.call_id is not None:
                self._pending_calls.pop(push.call_id, None)
            return
        if not push.is_call:
            self.stats["other_pushes"] += 1
            return
        self.stats["call_pushes"] += 1
        if self.profile.never_wakes or self.state == "stopped":
            self.stats["pushes_ignored"] += 1
            return
        if self.state == "awake":  # already in the foreground: claim the call at once
            self._spawn(self._claim(push.push_id))
            return
        self._pending_calls[push.call_id or push.push_id] = push.push_id
        self._wake.set()

    async def _claim(self, push_id: str) -> None:
        await self.report_progress(push_id)
        await self.report_state("active")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ SIP: calls

    def _own_contact(self, incoming: IncomingRequest) -> str:
        host, port = incoming.flow.local
        return f"<sip:{self.user}-app@{host}:{port}>"

    def _on_invite(self, incoming: IncomingRequest) -> None:
        self.stats["invites"] += 1
        if self.state != "awake":
            self.stats["invites_while_asleep"] += 1
            incoming.respond(480)
            return
        call_id = incoming.request.call_id
        dialog = _Dialog(call_id, incoming)
        self.dialogs[call_id] = dialog
        self._idle.clear()
        incoming.respond(180, headers=[("Contact", self._own_contact(incoming))])
        reject = self.rng.random() < self.profile.reject_rate
        delay = self.profile.answer_delay.sample(self.rng)
        loop = asyncio.get_running_loop()
        dialog.timer = loop.call_later(delay, self._reject if reject else self._answer, dialog)
        incoming.on_cancel(lambda _cancel: self._cancelled(dialog))

    def _answer(self, dialog: _Dialog) -> None:
        dialog.timer = None
        if dialog.incoming.respond(200, headers=[("Contact", self._own_contact(dialog.incoming)),
                                                 ("Content-Type", "application/sdp")], body=SDP_ANSWER):
            dialog.state = "answered"
            self.stats["answered"] += 1

    def _reject(self, dialog: _Dialog) -> None:
        dialog.timer = None
        status = 486 if self.rng.random() < 0.7 else 603
        if dialog.incoming.respond(status):
            self.stats["rejected"] += 1
        self._end(dialog)

    def _cancelled(self, dialog: _Dialog) -> None:
        if dialog.timer is not None:
            dialog.timer.cancel()
            dialog.timer = None
        self.stats["cancelled"] += 1
        self._end(dialog)

    def _end(self, dialog: _Dialog) -> None:
        dialog.state = "ended"
        self.dialogs.pop(dialog.call_id, None)
        if not self.dialogs:
            self._idle.set()

    def _on_ack(self, request: Request, _flow: Flow) -> None:
        dialog = self.dialogs.get(request.call_id)
        if dialog is not None and dialog.state == "answered":
            dialog.state = "confirmed"
            self.stats["acks"] += 1

    def _on_bye(self, incoming: IncomingRequest) -> None:
        try:
            call_id = incoming.request.call_id
        except SipParseError:
            incoming.respond(400)
            return
        dialog = self.dialogs.get(call_id)
        if dialog is None:
            incoming.respond(481)
            return
        incoming.respond(200)
        self.stats["byes"] += 1
        self._end(dialog)


def _push_token(push_type: str) -> str:
    """A token shaped like the platform's: FCM registration tokens are long URL-safe text with a
    colon, APNs device tokens (and the mediator's) 64 hex digits."""
    if push_type == "fcm":
        return f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(100)}"
    return secrets.token_hex(32)


# ====================================================================== the fleet


@dataclass(frozen=True)
class FleetSettings:
    """N phones: a base profile plus exact shares of awkward ones (rounded, at least one each when
    the rate is above zero and the fleet has room), and — drawn independently — exact shares of
    Android (``fcm_rate``) and iOS (``apns_rate``) apps; the rest push through the mediator."""

    apps: int = 12
    profile: PhoneProfile = field(default_factory=PhoneProfile)
    never_wake_rate: float = 0.1
    dead_token_rate: float = 0.05
    stale_password_rate: float = 0.05
    fcm_rate: float = 0.0
    apns_rate: float = 0.0
    user_prefix: str = "load"
    password: str = LOAD_PASSWORD
    enrol_concurrency: int = 16


def _share(apps: int, rate: float) -> int:
    if rate <= 0 or apps <= 0:
        return 0
    return min(apps, max(1, round(apps * rate)))


class PhoneFleet:
    """Starts, runs and stops :attr:`FleetSettings.apps` phones; users ``load0001`` … (the lab PBX
    knows every ``loadNNNN`` with the load password)."""

    def __init__(self, settings: FleetSettings, *, pbx: LabPbx, mediator: LabMediator, api_url: str,
                 api_ca_file: str | Path | None, enroll_token: str, seed: int = 0) -> None:
        self.settings = settings
        self.pbx = pbx
        self.mediator = mediator
        self.api_url = api_url
        self.api_ca_file = api_ca_file
        self.enroll_token = enroll_token
        self.seed = seed
        self.phones: list[LabPhone] = []
        self.api: httpx.AsyncClient | None = None

    def profiles(self) -> list[PhoneProfile]:
        """The profile of each phone, awkward ones and FCM/APNs apps at seeded-shuffled positions."""
        s = self.settings
        base = s.profile
        kinds = (["never"] * _share(s.apps, s.never_wake_rate) + ["dead"] * _share(s.apps, s.dead_token_rate)
                 + ["stale"] * _share(s.apps, s.stale_password_rate))[: s.apps]
        kinds += ["normal"] * (s.apps - len(kinds))
        random.Random(f"{self.seed}:profiles").shuffle(kinds)
        variants = {"normal": base, "never": replace(base, never_wakes=True),
                    "dead": replace(base, dead_token=True), "stale": replace(base, stale_password=True)}
        platforms = (["fcm"] * _share(s.apps, s.fcm_rate) + ["apns"] * _share(s.apps, s.apns_rate))[: s.apps]
        platforms += [""] * (s.apps - len(platforms))  # "": the base profile's provider
        random.Random(f"{self.seed}:providers").shuffle(platforms)
        return [replace(variants[k], provider=PROVIDER_NAMES[p], push_type=p) if p else variants[k]
                for k, p in zip(kinds, platforms, strict=True)]

    async def start(self, *, live: bool = True) -> None:
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(self.api_ca_file))
                                         if self.api_ca_file else True)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self.api = httpx.AsyncClient(base_url=self.api_url, verify=verify, timeout=15, limits=limits)
        for index, profile in enumerate(self.profiles(), start=1):
            user = f"{self.settings.user_prefix}{index:04d}"
            self.phones.append(LabPhone(user, self.settings.password, pbx=self.pbx, api=self.api,
                                        enroll_token=self.enroll_token, mediator=self.mediator, profile=profile,
                                        rng=random.Random(f"{self.seed}:{index}"), name=f"Lab phone {index}"))
        gate = asyncio.Semaphore(self.settings.enrol_concurrency)

        async def start_one(phone: LabPhone) -> None:
            async with gate:
                await phone.start(live=live)

        await asyncio.gather(*(start_one(p) for p in self.phones))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.phones), return_exceptions=True)
        if self.api is not None:
            await self.api.aclose()  # before the core stops: a kept-alive connection holds up its shutdown
            self.api = None

    @property
    def users(self) -> list[str]:
        return [p.user for p in self.phones]

    def by_user(self, user: str) -> LabPhone | None:
        return next((p for p in self.phones if p.user == user), None)

    def states(self) -> Counter[str]:
        return Counter(p.state for p in self.phones)

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.phones)

    def push_types(self) -> Counter[str]:
        return Counter(p.profile.push_type for p in self.phones)

    def stats(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for phone in self.phones:
            total.update(phone.stats)
        return total


__all__ = ["APP_ID", "FleetSettings", "LabPhone", "PhoneFleet", "PhoneProfile"]
