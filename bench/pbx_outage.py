"""Benchmark: recovery after a registrar outage (issue 14's scenario).

The real core (``sipis-console serve``) with the default backoff and ``--register-rate`` (50), N
sleeping apps (``--instances``, 300) registered over TCP through a real Kamailio; Kamailio is
stopped for ``--outage`` seconds (60) and started again (usrloc in memory: every binding is gone).
``recovery_s``: from Kamailio's start until it holds every binding again; the goal is
``10 + N / register_rate + 5`` s (``goal_s``). Exit status 1 when the goal is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

from bench._common import Outcome, run_main
from lab.core_process import CoreProcess
from lab.kamailio import Kamailio
from lab.outage import NO_API_LIMITS, run_outage

log = logging.getLogger("bench.pbx_outage")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--register-rate", type=float, default=50.0)
    parser.add_argument("--outage", type=float, default=60.0)
    args = parser.parse_args()

    def run() -> Outcome:
        goal = 10.0 + args.instances / args.register_rate + 5.0
        with tempfile.TemporaryDirectory() as folder, Kamailio() as kam, \
                CoreProcess(Path(folder), sip_options={"register_rate": args.register_rate, "backoff_base": 2.0,
                                                       "backoff_max": 300.0},
                            extra_config=NO_API_LIMITS) as core:
            result = run_outage(kam, core, args.instances, args.outage, recovery_timeout=600.0)
        doc = {"benchmark": "pbx_outage", "register_rate": args.register_rate, "goal_s": goal,
               **dataclasses.asdict(result)}
        return doc, result.recovery_s <= goal

    return run_main("pbx_outage", log, run)


if __name__ == "__main__":
    raise SystemExit(main())
