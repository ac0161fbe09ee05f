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
from sipis.alarms import AlarmBoard
from sipis.api.app_api import create_app
from sipis.api.limits import RateLimits
from sipis.api.server import ApiServer
from sipis.calls import CallManager
from sipis.clock import Clock, SystemClock
from sipis.cluster import ClusterView, InstanceSync, LeaseKeeper
from sipis.config import Config, insecure_settings
from sipis.crypto import KeyFileError, SecretBox, load_or_create_key
from sipis.engine import RegistrationEngine
from sipis.events import EventBus
from sipis.health import LOG_INTERVAL, HealthMonitor
from sipis.hep_client import HepClient
from sipis.housekeeping import Housekeeping
from sipis.inbound import InboundGate
from sipis.instance import Instance
from sipis.lifecycle import InstanceLifecycle
from sipis.listeners import opening
from sipis.metrics import CoreMetrics, LoopLag, metrics_server
from sipis.operations import Operations
from sipis.operator_api import OperatorContext, OperatorServer, OperatorSessions
from sipis.persistence import InstancePersistence
from sipis.proxy_register import ProxyRegistrar
from sipis.push.delivery import PushDelivery
from sipis.push.registry import build_providers
from sipis.readiness import Readiness
from sipis.service import InstanceService
from sipis.sip import IMPLEMENTATION as SIP_IMPLEMENTATION
from sipis.sip.endpoint import EndpointSettings, SipEndpoint
from sipis.sip.resolver import Resolver
from sipis.sip.sources import TrustedSources
from sipis.sip.transaction import TimerSettings
from sipis.sip.transport import ListenSpec, TlsSettings
from sipis.ssh_server import ConsoleSshServer, console_command
from sipis.tasks import cancel_and_wait
from sipis.text_messages import TextMessages
from sipis.timers import LoopTimers
from sipis.tls_certs import ensure_self_signed
from sipis.trace import TraceRecorder
from storage.cluster import Signals
from storage.database import Database
from storage.pg_repositories import pg_stores
from storage.postgres import PgDatabase, open_when_reachable
from storage.repositories import Stores, sqlite_stores
from storage.writer import BatchedWriter

#: seconds the goodbye REGISTERs get at shutdown: a registrar that does not answer must not hold
#: SIGTERM up (service managers and scripts expect the core gone within 2 s)
UNREGISTER_BUDGET = 1.0

log = logging.getLogger(__name__)

DB_FILE = "sipis.db"
#: seconds between two looks at the peers' health (alarm windows, probes of dead registrar targets)
WATCH_INTERVAL = 5.0


@dataclass
class Listening:
    sip: list[ListenSpec]
    api_url: str | None
    operator_socket: str | None = None
    operator_url: str | None = None
    ssh: tuple[str, int] | None = None
    metrics_url: str | None = None


class Core:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.bus = EventBus(self.clock)
        self.db: Database | PgDatabase | None = None
        self.stores: Stores | None = None
        self.writer: BatchedWriter | None = None
        self.endpoint: SipEndpoint | None = None
        self.engine: RegistrationEngine | None = None
        self.lifecycle: InstanceLifecycle | None = None
        self.service: InstanceService | None = None
        self.api: ApiServer | None = None
        self.ageing: Ageing | None = None
        #: event pruning (each node) and forgetting long-gone nodes (one node: the singleton's holder)
        self.housekeeping: Housekeeping | None = None
        self.delivery: PushDelivery | None = None
        self.calls: CallManager | None = None
        self.messages: TextMessages | None = None
        self.operations: Operations | None = None
        self.health: HealthMonitor | None = None
        self.alarms: AlarmBoard | None = None
        self._watch: asyncio.Task[None] | None = None
        #: how late the event loop runs timers: read by readiness and by the metrics
        self.loop_lag = LoopLag(self.clock, LoopTimers())
        self.readiness = Readiness(storage_error=self._storage_error, sip_listening=lambda: bool(self.listening.sip),
                                   loop_lag=self.loop_lag.latest)
        #: which instances this node acts for (None: storage without leases, every instance is ours)
        self.keeper: LeaseKeeper | None = None
        #: cross-node signals (None: one node without them) and what carries stored changes over them
        self.signals: Signals | None = None
        self.sync: InstanceSync | None = None
        #: every SIP message in and out, per call and per instance (fed by the endpoint's observer hook)
        self.trace = TraceRecorder(self.clock)
        self.hep: HepClient | None = None  # HEP v3 to Homer, when [hep] collector is set
        #: per-console-session operator tokens (the SSH server mints and revokes them)
        self.operator_sessions = OperatorSessions()
        self.operator_context: OperatorContext | None = None
        self.operator_api: OperatorServer | None = None
        self.ssh: ConsoleSshServer | None = None
        #: Prometheus metrics (only with ``[metrics] listen``)
        self.metrics: CoreMetrics | None = None
        self.metrics_api: ApiServer | None = None
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
        self.stores = await self._open_storage()
        box = SecretBox(load_or_create_key(config.storage.key_file))
        assert self.db is not None
        self.bus = EventBus(self.clock, first_seq=await self.stores.events.last_seq() + 1)
        self.writer = BatchedWriter(self.db, self.stores)
        self.writer.start()

        self.endpoint = SipEndpoint(self._endpoint_settings())
        self.endpoint.observers.append(self.trace.observe)
        if config.hep.collector is not None:  # the same hook as the trace, and push stages from the bus
            self.hep = HepClient(config.hep, self.clock)
            await self.hep.start()
            self.endpoint.observers.append(self.hep.observe)
            self.bus.subscribe(self.hep.on_event)
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
        self.health = HealthMonitor(self.bus, self.clock)
        registrar.on_target_result = self.health.pbx_result
        self.endpoint.flow_closed_listeners.append(self.health.flow_lost)
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
        self.alarms = AlarmBoard(self.bus, self.clock, self.lifecycle.get)
        self.writer.on_failing = self.alarms.storage
        self.operations = Operations(service=self.service, lifecycle=self.lifecycle, delivery=self.delivery,
                                     bus=self.bus, clock=self.clock, alarms=self.alarms)
        cluster = await self._wire_cluster(persistence)
        self._wire_operator(self.service, self.delivery, self.calls, self.operations, self.writer, cluster)
        if config.metrics.listen is not None:  # counting from the restore on
            assert self.operator_context is not None
            self.metrics = CoreMetrics(self.operator_context, self.loop_lag, const_labels={"node": config.node_name})
        restored = 0
        for record in await self.stores.instances.load_all():
            self.service.resume(persistence.restore(record))
            restored += 1
        persistence.attach(self.bus)
        if self.keeper is not None:
            await self.keeper.start()
        await registrar.learn_registrars()  # calls for restored bindings are taken from the start
        self.engine.start()
        log.info("restored %d instances", restored)
        self.bus.publish(None, CoreStarted(restored, config.node_name))

        self.ageing = Ageing(self.lifecycle, self.clock, config.ageing)
        self.ageing.signal = self.sync
        self.ageing.start(config.ageing.check_interval)
        self.housekeeping = Housekeeping(events=self.stores.events, nodes=self.stores.nodes,
                                         singleton=self.stores.singletons, clock=self.clock,
                                         lease_ttl=config.cluster.lease_ttl)
        self.housekeeping.start()
        self._watch = asyncio.create_task(self._watch_peers(), name="watch-peers")
        self.loop_lag.start()

        api = config.api
        if api.listen is not None:
            if api.tls and api.tls_generate:
                ensure_self_signed(api.tls_cert, api.tls_key, [api.listen.host, "localhost"])
            app = create_app(self.service, providers=tuple(config.push), limits=RateLimits(api, self.clock),
                             readiness=self.readiness.reasons)
            self.api = ApiServer(app, api.listen.host, api.listen.port, tls=api.tls,
                                 certfile=api.tls_cert if api.tls else None,
                                 keyfile=api.tls_key if api.tls else None)
            with opening("app API", f"{api.listen.host}:{api.listen.port}"):
                await self.api.start()
            self.listening.api_url = self.api.url
        await self._start_operator_api()
        await self._start_metrics()
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

    async def _open_storage(self) -> Stores:
        """Embedded SQLite in state_dir, or the cluster's PostgreSQL (waited for, boundedly)."""
        storage = self.config.storage
        if storage.url is None:
            self.db = await Database.open(self.config.state_dir / DB_FILE)
            return sqlite_stores(self.db)
        self.db = await open_when_reachable(storage.url, storage.connect_timeout)
        stores = pg_stores(self.db, self.config.node_name)
        # A fresh key on one node would make every other node's stored passwords unreadable to it.
        if not storage.key_file.exists() and await stores.instances.count_by_state():
            raise KeyFileError(f"key file {storage.key_file} does not exist but the database already holds "
                               "instances: copy the cluster's key file from another node")
        log.info("storage: PostgreSQL %s as node %s", self.db.url, self.config.node_name)
        return stores

    async def _wire_cluster(self, persistence: InstancePersistence) -> ClusterView:
        """Leases and signals (on SQLite: one node that claims everything, signals in-process): the
        keeper decides which instances this node acts for (restored instances wait for its first
        round), stored changes reach the other nodes, operators' actions reach the owner."""
        assert self.stores is not None and self.lifecycle is not None and self.service is not None
        assert self.operations is not None
        stores, lifecycle, config = self.stores, self.lifecycle, self.config
        self.signals = stores.signals
        keeper = self.keeper = LeaseKeeper(node=config.node_name, leases=stores.leases, nodes=stores.nodes,
                                           clock=self.clock,
                                           ttl=config.cluster.lease_ttl, register_rate=config.sip.register_rate)
        lifecycle.use_ownership(keeper)
        keeper.listener = lifecycle
        keeper.signals = self.signals
        persistence.acts_for = lifecycle.owns

        async def load(selector: str) -> Instance | None:
            record = await stores.instances.get(selector)
            return persistence.restore(record) if record is not None else None

        sync = self.sync = InstanceSync(node=config.node_name, signals=self.signals, load=load, adopter=lifecycle)
        self.service.signal = sync
        lifecycle.load_missing = sync.reload_soon
        view = ClusterView(keeper=keeper, signals=self.signals, clock=self.clock)
        view.run_action = self.operations.carry_out
        self.operations.cluster = view
        sync.start()
        self.signals.subscribe(keeper.on_signal)
        self.signals.subscribe(view.on_signal)
        await self.signals.start()
        return view

    def _wire_operator(self, service: InstanceService, delivery: PushDelivery, calls: CallManager,
                       operations: Operations, writer: BatchedWriter, cluster: ClusterView | None) -> None:
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
            started_at=self.started_at, default_registrar=self.config.sip.default_registrar, health=self.health,
            cluster=cluster, signals=self.signals if self.config.storage.url is not None else None)

    async def _start_operator_api(self) -> None:
        assert self.operator_context is not None
        # index the restored instances now (before gc.freeze), not on the first console's request
        self.operator_context.index.sync()
        self.operator_api = OperatorServer.from_config(self.operator_context, self.config)
        await self.operator_api.start()
        self.listening.operator_socket = str(self.config.operator.socket)
        self.listening.operator_url = self.operator_api.tcp_url

    def _storage_error(self) -> str | None:
        return self.writer.status().last_error if self.writer is not None else "not open"

    async def _watch_peers(self) -> None:
        """Every :data:`WATCH_INTERVAL`: counting alarms judge their windows; every
        :data:`~sipis.health.LOG_INTERVAL`: one failure line per failing target."""
        assert self.alarms is not None and self.health is not None
        last_log = self.clock.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.alarms.tick()
            if self.clock.monotonic() - last_log >= LOG_INTERVAL:
                last_log = self.clock.monotonic()
                self.health.tick()

    async def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if listen is None or self.metrics is None:
            return
        self.metrics_api = metrics_server(self.metrics, listen.host, listen.port)
        with opening("metrics", f"{listen.host}:{listen.port}"):
            await self.metrics_api.start()
        self.listening.metrics_url = self.metrics_api.url

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

    async def hand_over(self) -> None:
        """Before a stop (SIGTERM): while other nodes are up, hand every instance over to them
        (paced, make-before-break), within ``cluster.drain_timeout``."""
        keeper = self.keeper
        if keeper is None or keeper.live_nodes < 2:
            return
        keeper.drain()
        if not await keeper.drained(self.config.cluster.drain_timeout):
            log.warning("drain: %d instances not handed over within %.0f s; the other nodes take them "
                        "after lease_ttl", keeper.held(), self.config.cluster.drain_timeout)

    async def stop(self) -> None:
        """Clean shutdown: stop taking requests, optionally unREGISTER, flush storage."""
        self.readiness.draining = True
        if self.ssh is not None:
            await self.ssh.stop()
        if self.operator_api is not None:
            await self.operator_api.stop()
        if self.operator_context is not None:
            self.operator_context.close()
        if self.api is not None:
            await self.api.stop()
        await cancel_and_wait(self._watch)
        if self.metrics_api is not None:
            await self.metrics_api.stop()
        self.loop_lag.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.ageing is not None:
            await self.ageing.stop()
        if self.housekeeping is not None:
            await self.housekeeping.stop()
        if self.keeper is not None:
            await self.keeper.stop()
        if self.signals is not None:
            await self.signals.close()
        if self.calls is not None:
            await self.calls.close()
        if self.engine is not None:
            await self.engine.stop(unregister=self.config.sip.unregister_on_shutdown, timeout=UNREGISTER_BUDGET)
        if self.delivery is not None:
            await self.delivery.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.hep is not None:
            self.hep.close()
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
