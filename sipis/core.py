"""The core process: builds every part from the config, restores state, runs, shuts down cleanly.

Start-up order matters: storage first (so restore can read), then the SIP endpoint (so the engine
can register), then restore every instance and hand sleeping ones to the paced engine, then the
app API. Shutdown is the reverse; the writer is flushed last so nothing said on the bus is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import dataclass

from contract.codec import to_json
from contract.events import CoreStarted, CoreStopped
from sipis.ageing import Ageing
from sipis.api.app_api import create_app
from sipis.api.limits import RateLimits
from sipis.api.server import ApiServer
from sipis.calls import CallManager
from sipis.clock import Clock, SystemClock
from sipis.config import Config, insecure_settings
from sipis.crypto import SecretBox, load_or_create_key
from sipis.engine import RegistrationEngine
from sipis.events import EventBus
from sipis.inbound import InboundGate
from sipis.lifecycle import InstanceLifecycle
from sipis.listeners import opening
from sipis.operations import Operations
from sipis.operator_api import OperatorContext, OperatorServer, OperatorSessions
from sipis.persistence import InstancePersistence
from sipis.proxy_register import ProxyRegistrar
from sipis.push.delivery import PushDelivery
from sipis.push.registry import build_providers
from sipis.service import InstanceService
from sipis.sip import IMPLEMENTATION as SIP_IMPLEMENTATION
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.resolver import Resolver
from sipis.sip.sources import TrustedSources
from sipis.sip.transaction import TimerSettings
from sipis.sip.transport import ListenSpec, TlsSettings
from sipis.ssh_server import ConsoleSshServer, console_command
from sipis.text_messages import TextMessages
from sipis.timers import LoopTimers
from sipis.tls_certs import ensure_self_signed
from sipis.trace import TraceRecorder
from storage.database import Database
from storage.repositories import Stores, sqlite_stores
from storage.writer import BatchedWriter

#: seconds the goodbye REGISTERs get at shutdown: a registrar that does not answer must not hold
#: SIGTERM up (service managers and scripts expect the core gone within 2 s)
UNREGISTER_BUDGET = 1.0

log = logging.getLogger(__name__)

DB_FILE = "sipis.db"
KEY_FILE = "credentials.key"


@dataclass
class Listening:
    sip: list[ListenSpec]
    api_url: str | None
    operator_socket: str | None = None
    operator_url: str | None = None
    ssh: tuple[str, int] | None = None


class Core:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.bus = EventBus(self.clock)
        self.db: Database | None = None
        self.stores: Stores | None = None
        self.writer: BatchedWriter | None = None
        self.endpoint: SipEndpoint | None = None
        self.engine: RegistrationEngine | None = None
        self.lifecycle: InstanceLifecycle | None = None
        self.service: InstanceService | None = None
        self.api: ApiServer | None = None
        self.ageing: Ageing | None = None
        self.delivery: PushDelivery | None = None
        self.calls: CallManager | None = None
        self.messages: TextMessages | None = None
        self.operations: Operations | None = None
        #: every SIP message in and out, per call and per instance (fed by the endpoint's observer hook)
        self.trace = TraceRecorder(self.clock)
        #: per-console-session operator tokens (the SSH server mints and revokes them)
        self.operator_sessions = OperatorSessions()
        self.operator_context: OperatorContext | None = None
        self.operator_api: OperatorServer | None = None
        self.ssh: ConsoleSshServer | None = None
        self.listening = Listening([], None)
        self._stopped = asyncio.Event()
        self.started_at = self.clock.wall()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Listening:
        config = self.config
        for warning in insecure_settings(config):
            log.warning("lab-only setting in use: %s", warning)
        # a stale or partial compiled build still runs (as Python), only slower: say so
        log.log(logging.WARNING if SIP_IMPLEMENTATION.degraded else logging.INFO, SIP_IMPLEMENTATION.describe())
        state_dir = config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        box = SecretBox(load_or_create_key(state_dir / KEY_FILE))
        self.db = await Database.open(state_dir / DB_FILE)
        self.stores = sqlite_stores(self.db)
        self.bus = EventBus(self.clock, first_seq=await self.stores.events.last_seq() + 1)
        self.writer = BatchedWriter(self.db, self.stores)
        self.writer.start()

        self.endpoint = SipEndpoint(self._endpoint_settings())
        self.endpoint.observers.append(self.trace.observe)
        try:
            self.listening.sip = await self.endpoint.start()
        except OSError as exc:
            # the specs open in order: the first one not listening is the one that failed
            failed = self.endpoint.settings.listen[len(self.endpoint.transport.listening)]
            with opening("SIP", str(failed)):
                raise exc from None
        sip = config.sip
        registrar = ProxyRegistrar(self.endpoint, Resolver(clock=self.clock),
                                   default_registrar=sip.default_registrar, user_agent=sip.user_agent)
        self.engine = RegistrationEngine(registrar, self.bus, self.clock, sip)
        registrar.on_flow_lost = self.engine.flow_lost
        self.lifecycle = InstanceLifecycle(engine=self.engine, registrar=registrar, bus=self.bus, clock=self.clock)
        self.delivery = PushDelivery(build_providers(config.push), self.bus, self.clock)
        calls = config.calls
        self.calls = CallManager(lifecycle=self.lifecycle, delivery=self.delivery, bus=self.bus, clock=self.clock,
                                 timers=LoopTimers(), settings=calls)
        persistence = InstancePersistence(self.writer, box, self.lifecycle.get, self.clock,
                                          commit_timeout=config.api.commit_timeout)
        self.service = InstanceService(lifecycle=self.lifecycle, registrar=registrar, bus=self.bus, clock=self.clock,
                                       enroll_tokens=config.api.enroll_tokens, calls=self.calls,
                                       storage=persistence)
        self.messages = TextMessages(lifecycle=self.lifecycle, delivery=self.delivery, bus=self.bus,
                                     clock=self.clock, max_body=calls.max_message_body)
        self.endpoint.handlers["INVITE"] = self.calls.on_invite
        self.endpoint.handlers["MESSAGE"] = self.messages.on_message
        gate = InboundGate(self.lifecycle, registrar, TrustedSources(sip.trusted_sources))
        self.endpoint.screens["INVITE"] = self.endpoint.screens["MESSAGE"] = gate
        self.operations = Operations(service=self.service, lifecycle=self.lifecycle, delivery=self.delivery,
                                     bus=self.bus, clock=self.clock)
        self._wire_operator(self.service, self.delivery, self.calls, self.operations, self.writer)
        restored = 0
        for record in await self.stores.instances.load_all():
            self.service.resume(persistence.restore(record))
            restored += 1
        persistence.attach(self.bus)
        await registrar.learn_registrars()  # calls for restored bindings are taken from the start
        self.engine.start()
        log.info("restored %d instances", restored)
        self.bus.publish(None, CoreStarted(restored, config.node_name))

        self.ageing = Ageing(self.lifecycle, self.clock, config.ageing)
        self.ageing.start(config.ageing.check_interval)

        api = config.api
        if api.listen is not None:
            if api.tls and api.tls_generate:
                ensure_self_signed(api.tls_cert, api.tls_key, [api.listen.host, "localhost"])
            app = create_app(self.service, providers=tuple(config.push), limits=RateLimits(api, self.clock))
            self.api = ApiServer(app, api.listen.host, api.listen.port, tls=api.tls,
                                 certfile=api.tls_cert if api.tls else None,
                                 keyfile=api.tls_key if api.tls else None)
            with opening("app API", f"{api.listen.host}:{api.listen.port}"):
                await self.api.start()
            self.listening.api_url = self.api.url
        await self._start_operator_api()
        if config.ssh.listen is not None:
            self.ssh = ConsoleSshServer(config.ssh, self.operator_sessions, config.operator.socket,
                                        audit=self.operations.audit,
                                        command=console_command(config.operator.socket, config.console.export_dir))
            with opening("SSH", f"{config.ssh.listen.host}:{config.ssh.listen.port}"):
                self.listening.ssh = await self.ssh.start()
        # Everything built so far lives as long as the process: keep it out of the cyclic GC's
        # generations so full collections (measured 120–280 ms stalls under call load) stay short.
        gc.collect()
        gc.freeze()
        return self.listening

    def _wire_operator(self, service: InstanceService, delivery: PushDelivery, calls: CallManager,
                       operations: Operations, writer: BatchedWriter) -> None:
        """The trace recorder's lookups and the operator API's view of the core (its event ring
        subscribes now, so it holds what happens from restore on)."""

        def selector_of_user(user: str) -> str | None:
            instance = service.by_contact_user(user)
            return instance.selector if instance is not None else None

        self.trace.selector_of_user = selector_of_user
        self.trace.push_source = lambda call_id: [to_json(t.record()) for t in delivery.traces.values()
                                                  if t.call_id == call_id]
        self.operator_context = OperatorContext(
            service=service, calls=calls, delivery=delivery, operations=operations, bus=self.bus,
            clock=self.clock, trace=self.trace, sessions=self.operator_sessions, tokens=self.config.operator.tokens,
            stores=self.stores, writer_status=writer.status, node=self.config.node_name,
            started_at=self.started_at, default_registrar=self.config.sip.default_registrar)

    async def _start_operator_api(self) -> None:
        assert self.operator_context is not None
        # index the restored instances now (before gc.freeze), not on the first console's request
        self.operator_context.index.sync()
        self.operator_api = OperatorServer.from_config(self.operator_context, self.config)
        await self.operator_api.start()
        self.listening.operator_socket = str(self.config.operator.socket)
        self.listening.operator_url = self.operator_api.tcp_url

    def _endpoint_settings(self) -> EndpointSettings:
        sip = self.config.sip
        listen = [ListenSpec(spec.transport, spec.host, spec.port) for spec in sip.listen]
        if any(spec.transport == "tls" for spec in listen) and sip.tls_generate:
            ensure_self_signed(sip.tls_cert, sip.tls_key, sorted({spec.host for spec in listen}))
        tls = TlsSettings(
            ca_file=str(sip.ca_file) if sip.ca_file else None, verify=sip.tls_verify,
            client_cert=str(sip.tls_client_cert) if sip.tls_client_cert else None,
            client_key=str(sip.tls_client_key) if sip.tls_client_key else None,
            server_cert=str(sip.tls_cert), server_key=str(sip.tls_key),
        )
        return EndpointSettings(listen=listen, tls=tls, timers=TimerSettings(sip.t1, sip.t2, sip.t4),
                                user_agent=sip.user_agent, keepalive_interval=sip.keepalive_interval,
                                idle_timeout=sip.idle_timeout, max_connections=sip.max_connections,
                                max_connections_per_source=sip.max_connections_per_source)

    async def stop(self) -> None:
        """Clean shutdown: stop taking requests, optionally unREGISTER, flush storage."""
        if self.ssh is not None:
            await self.ssh.stop()
        if self.operator_api is not None:
            await self.operator_api.stop()
        if self.operator_context is not None:
            self.operator_context.close()
        if self.api is not None:
            await self.api.stop()
        if self.ageing is not None:
            await self.ageing.stop()
        if self.calls is not None:
            await self.calls.close()
        if self.engine is not None:
            await self.engine.stop(unregister=self.config.sip.unregister_on_shutdown, timeout=UNREGISTER_BUDGET)
        if self.delivery is not None:
            await self.delivery.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        self.bus.publish(None, CoreStopped())
        if self.writer is not None:
            await self.writer.close()
        if self.db is not None:
            await self.db.close()
        self._stopped.set()

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await self.stop()
