"""``python -m sipis.sip``: which form of the SIP layer runs; exit status 1 when a compiled build
is there but unusable (its sources changed since: run scripts/compile)."""

import sys

from sipis.sip import IMPLEMENTATION

print(IMPLEMENTATION.describe())
sys.exit(1 if IMPLEMENTATION.degraded else 0)
