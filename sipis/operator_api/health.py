"""What the operator API says about the core's peers: the health of registrar targets and push
providers (:func:`pbx_status`, :func:`health_targets`, from :class:`~sipis.health.HealthMonitor`)
and how pushes fare (:func:`push_stats`, over the delivery's recent traces)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from contract.documents import HealthTarget, HealthTargets, PbxStatus, PushStats
from contract.kinds import HealthState, HealthSubject
from sipis.health import HealthMonitor
from sipis.instance import Instance
from sipis.push.delivery import PushDelivery

PUSH_STATS_WINDOW = 1000


def pbx_status(health: HealthMonitor) -> PbxStatus:
    """The summary's PBX part: registrar targets per state and the newest error of one not up."""
    counts = health.counts(HealthSubject.PBX)
    failing = [t for t in health.targets.values() if t.subject is HealthSubject.PBX
               and t.state is not HealthState.UP and t.last_error_at is not None]
    last = max(failing, key=lambda t: t.last_error_at or 0.0, default=None)
    return PbxStatus(not counts.get(HealthState.DOWN, 0), last.last_error if last is not None else None,
                     **{state.value: counts.get(state, 0) for state in HealthState})


def health_targets(health: HealthMonitor, instances: Iterable[Instance]) -> HealthTargets:
    """Every target with its state and how many instances registered there last / use the provider."""
    per_target: Counter[tuple[HealthSubject, str]] = Counter()
    for instance in instances:
        if instance.registration.target is not None:
            per_target[(HealthSubject.PBX, instance.registration.target)] += 1
        per_target[(HealthSubject.PROVIDER, instance.push.provider)] += 1
    order = list(HealthSubject)
    return HealthTargets([
        HealthTarget(t.subject.value, t.name, t.state.value, t.since, t.last_error, t.last_error_at,
                     per_target[(t.subject, t.name)])
        for t in sorted(health.targets.values(), key=lambda t: (order.index(t.subject), t.name))])


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return round(sorted_values[index], 1)


def push_stats(delivery: PushDelivery, window: int = PUSH_STATS_WINDOW) -> PushStats:
    """Outcomes and latency of the last ``window`` finished pushes (pending ones do not count)."""
    accepted = rejected = transient = 0
    latencies: list[float] = []
    for trace in reversed(delivery.traces.values()):
        verdict = trace.outcome
        if verdict == "pending":
            continue
        if verdict == "accepted":
            accepted += 1
        elif verdict == "rejected-permanent":
            rejected += 1
        else:
            transient += 1
        if trace.latency_ms is not None:
            latencies.append(trace.latency_ms)
        if accepted + rejected + transient >= window:
            break
    finished = accepted + rejected + transient
    latencies.sort()
    return PushStats(accepted, rejected, transient, round(accepted / finished, 4) if finished else None,
                     _percentile(latencies, 0.5), _percentile(latencies, 0.99))
