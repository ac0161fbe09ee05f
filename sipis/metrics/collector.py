"""The Prometheus metrics of one core (``sipis_*``, base units, no per-instance labels).

Two kinds of source, one writer per fact:

- **the bus** (:class:`~sipis.events.EventBus`): registrations, REGISTER durations, PBX health,
  pushes, wake-up stages and active alarms are counted here as their events pass;
- **scrape time** (:class:`_ScrapeCollector`): figures the core already keeps are read when
  Prometheus asks — instances per state and per registration status (the operator API's instance
  index), held calls and call outcomes (the call manager), storage backlog (the writer), the loop
  lag sampler and the build. Each is a handful of numbers: a scrape costs the same with 10 or
  100k instances.

Every series carries :attr:`CoreMetrics.const_labels` first: the core sets ``node`` (its
``node_name``) there and nowhere else, on one node as in a cluster, so dashboards need no change.
"""

from __future__ import annotations

import platform
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from contract.documents import PushRecord
from contract.events import Alarm, Event, HealthChanged, RegistrationResult
from contract.kinds import AlarmState, HealthState, HealthSubject
from sipis.metrics.lag import LoopLag
from sipis.operator_api.context import OperatorContext
from sipis.sip import IMPLEMENTATION as SIP_IMPLEMENTATION

REGISTER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 32.0)
PUSH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)
#: push stages timed from ``invite_received`` (``sipis_wake_duration_seconds{stage}``)
WAKE_STAGES = ("push_sent", "provider_accepted", "device_progress", "app_active", "released")
#: pushes whose counted attempt is remembered (a push is re-published at each later stage)
RECENT_PUSHES = 4096


def apply_alarm(active: dict[str, int], alarm: Alarm) -> str | None:
    """Count ``alarm`` into ``active`` (alarm kind → open episodes); returns the kind it changed.

    Only episodes count (``state`` raised or cleared); the per-instance alarms without a state
    (``unauthorized``, ``push-rejected``) are never open, so they are not active alarms."""
    if alarm.state is None:
        return None
    kind = alarm.alarm.value
    step = 1 if alarm.state is AlarmState.RAISED else -1
    active[kind] = max(0, active.get(kind, 0) + step)
    return kind


class CoreMetrics:
    """The registry ``/metrics`` serves, fed from ``ctx``'s bus and read models."""

    def __init__(self, ctx: OperatorContext, lag: LoopLag, *, const_labels: Mapping[str, str] | None = None) -> None:
        self.ctx = ctx
        self.lag = lag
        #: labels every series carries (the cluster's ``node``): set here only
        self.const_labels: dict[str, str] = dict(const_labels or {})
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` twin of every counter and histogram series
        self.registry = CollectorRegistry(auto_describe=True)
        names = tuple(self.const_labels)
        registry = self.registry
        self.registrations = Counter("sipis_registrations", "REGISTER exchanges that ended, by registrar and result",
                                     (*names, "pbx", "result"), registry=registry)
        self.register_duration = Histogram("sipis_register_duration_seconds",
                                           "how long one REGISTER exchange took (with its digest retry)",
                                           names, registry=registry, buckets=REGISTER_BUCKETS)
        self.pbx_up = Gauge("sipis_pbx_up", "1 while the registrar target is up, 0 otherwise (unknown, degraded, "
                            "down)", (*names, "pbx"), registry=registry)
        self.pushes = Counter("sipis_pushes", "push attempts that ended, by provider, push kind and outcome",
                              (*names, "provider", "kind", "outcome"), registry=registry)
        self.push_duration = Histogram("sipis_push_duration_seconds", "provider round trip of one push attempt",
                                       (*names, "provider"), registry=registry, buckets=PUSH_BUCKETS)
        self.wake_duration = Histogram("sipis_wake_duration_seconds", "from the INVITE to each stage of waking the "
                                       "app (push_sent, provider_accepted, device_progress, app_active, released)",
                                       (*names, "stage"), registry=registry, buckets=WAKE_BUCKETS)
        self.alarms_active = Gauge("sipis_alarms_active", "alarm episodes open now, by alarm kind",
                                   (*names, "alarm"), registry=registry)
        registry.register(_ScrapeCollector(self))
        self._active: dict[str, int] = {}
        #: push id → [highest attempt counted, wake stages observed]
        self._pushes: OrderedDict[str, list[Any]] = OrderedDict()
        self._handlers: dict[type, Callable[[Event, Any], None]] = {
            RegistrationResult: self._registration, HealthChanged: self._health, PushRecord: self._push,
            Alarm: self._alarm}
        self._unsubscribe = ctx.bus.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def labelled(self, metric: Any, **labels: str) -> Any:
        """The child of ``metric`` for ``labels`` plus the constant labels."""
        # every metric's label names are the constant ones, then its own: none at all, no child
        return metric.labels(**self.const_labels, **labels) if self.const_labels or labels else metric

    def _on_event(self, event: Event) -> None:
        handler = self._handlers.get(type(event.payload))
        if handler is not None:
            handler(event, event.payload)

    def registration_pbx(self, event: Event, result: RegistrationResult) -> str:
        """The ``pbx`` label of a registration: the registrar target the result names, else the
        instance's registrar as configured (its own, the default, else its aor's domain)."""
        target = getattr(result, "target", None)
        if target:
            return str(target)
        instance = self.ctx.service.instances.get(event.selector or "")
        if instance is None:
            return "unknown"
        registrar = self.ctx.index.registrar_of(instance)
        if registrar:
            return registrar
        scheme, _, rest = instance.account.aor.partition(":")
        return f"{scheme}:{rest.rpartition('@')[2].split(';')[0]}"

    def _registration(self, event: Event, result: RegistrationResult) -> None:
        self.labelled(self.registrations, pbx=self.registration_pbx(event, result), result=result.result).inc()
        if result.duration is not None:
            self.labelled(self.register_duration).observe(result.duration)

    def _health(self, event: Event, health: HealthChanged) -> None:
        if health.subject is HealthSubject.PBX:
            self.labelled(self.pbx_up, pbx=health.target).set(1 if health.state is HealthState.UP else 0)

    def _alarm(self, event: Event, alarm: Alarm) -> None:
        kind = apply_alarm(self._active, alarm)
        if kind is not None:
            self.labelled(self.alarms_active, alarm=kind).set(self._active[kind])

    def _push(self, event: Event, push: PushRecord) -> None:
        seen = self._pushes.get(push.push_id)
        if seen is None:
            seen = self._pushes[push.push_id] = [-1, False]
            if len(self._pushes) > RECENT_PUSHES:
                self._pushes.popitem(last=False)
        if push.outcome != "pending" and push.attempt > seen[0]:
            seen[0] = push.attempt
            self.labelled(self.pushes, provider=push.provider, kind=push.kind, outcome=push.outcome).inc()
            if push.latency_ms is not None:
                self.labelled(self.push_duration, provider=push.provider).observe(push.latency_ms / 1000.0)
        stages = push.stages
        if not seen[1] and ("released" in stages or "ended" in stages):
            seen[1] = True
            start = stages.get("invite_received")
            if start is not None:
                for stage in WAKE_STAGES:
                    at = stages.get(stage)
                    if at is not None:
                        self.labelled(self.wake_duration, stage=stage).observe(max(0.0, at - start))


class _ScrapeCollector(Collector):
    """The gauges and counters read when Prometheus scrapes (no per-event work)."""

    def __init__(self, metrics: CoreMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:  # the names are fixed: no collect() at registration
        return []

    def collect(self) -> Iterator[Metric]:
        metrics, ctx = self.metrics, self.metrics.ctx
        names, values = list(metrics.const_labels), list(metrics.const_labels.values())
        states, statuses = ctx.state_counts()
        family = GaugeMetricFamily("sipis_instances", "instances per state", labels=[*names, "state"])
        for state, count in states.items():
            family.add_metric([*values, state], count)
        yield family
        family = GaugeMetricFamily("sipis_registration_status", "instances per registration status",
                                   labels=[*names, "status"])
        for status, count in statuses.items():
            family.add_metric([*values, status], count)
        yield family
        counter = CounterMetricFamily("sipis_calls", "INVITEs for our bindings that ended, by outcome",
                                      labels=[*names, "outcome"])
        for outcome, count in ctx.calls.outcomes.items():
            counter.add_metric([*values, outcome], count)
        yield counter
        yield self._gauge("sipis_held_calls", "INVITEs held now, waiting for a woken app", len(ctx.calls.held))
        pending = ctx.writer_status().pending if ctx.writer_status is not None else 0
        yield self._gauge("sipis_storage_pending", "changes waiting to be committed to storage", pending)
        yield self._gauge("sipis_event_loop_lag_seconds", "longest delay of the core's event loop in the last "
                          f"{metrics.lag.window:g} s", metrics.lag.worst())
        info = InfoMetricFamily("sipis_build", "version of this core", labels=names)
        info.add_metric(values, {"version": ctx.version, "python": platform.python_version(),
                                 "sip": "compiled" if SIP_IMPLEMENTATION.compiled else "python"})
        yield info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        metrics = self.metrics
        family = GaugeMetricFamily(name, doc, labels=list(metrics.const_labels))
        family.add_metric(list(metrics.const_labels.values()), value)
        return family
