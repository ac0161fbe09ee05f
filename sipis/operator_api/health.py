"""What the summary says about the core's peers: whether the PBX answers (:class:`PbxHealth`, kept
from the bus) and how pushes fare (:func:`push_stats`, over the delivery's recent traces)."""

from __future__ import annotations

from contract.documents import PushStats
from contract.events import Event, RegistrationResult
from sipis.events import EventBus
from sipis.push.delivery import PushDelivery

PUSH_STATS_WINDOW = 1000


class PbxHealth:
    """Is the PBX answering? Judged by the last registration exchange of any instance: an answer
    (any final response but 408/5xx) means reachable; a timeout, transport failure or 5xx means not,
    and its text is ``last_error`` until the next answer. No registration yet counts as reachable."""

    def __init__(self, bus: EventBus) -> None:
        self.reachable = True
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_answer_at: float | None = None
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        result = event.payload
        if not isinstance(result, RegistrationResult):
            return
        code = result.code
        if code == 408 or code >= 500:
            self.reachable = False
            detail = result.detail
            self.last_error = f"{code} {result.reason or ''}".strip() + (f": {detail}" if detail else "")
            self.last_error_at = event.at
        else:
            self.reachable = True
            self.last_error = None
            self.last_answer_at = event.at

    def close(self) -> None:
        self._unsubscribe()


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
