"""CPU accounting of peer processes (Kamailio, sipp, the mediator child) from Linux /proc,
shared by the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path


def group_cpu_seconds(pgid: int) -> float:
    """user+sys CPU seconds of all live processes in process group ``pgid`` (Linux /proc)."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()  # from field 3 (state) on
        if int(fields[2]) == pgid:  # field 5: pgrp
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of one process (Linux /proc); 0 when it is gone."""
    try:
        data = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
