"""Monitoring: Prometheus metrics (:mod:`~sipis.metrics.collector`), the loop lag sampler
(:mod:`~sipis.metrics.lag`), Acrobits-compatible statistics (:mod:`~sipis.metrics.acrobits`) and
their HTTP listener (:mod:`~sipis.metrics.server`)."""

from sipis.metrics.acrobits import stats_summary
from sipis.metrics.collector import CoreMetrics, apply_alarm
from sipis.metrics.lag import LoopLag
from sipis.metrics.server import create_metrics_app, metrics_server

__all__ = ["CoreMetrics", "LoopLag", "apply_alarm", "create_metrics_app", "metrics_server", "stats_summary"]
