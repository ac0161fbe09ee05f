"""Several real cores (``sipis-console serve``) on one PostgreSQL in front of one Kamailio: a cluster
for the integration tests (and benchmarks).

Every node reads the same config apart from ``node_name`` and its listeners, as the issue's contract
says: the same ``[storage]`` URL and key file, the same ``[cluster] lease_ttl``, the same push
mediator. Folders are short paths under /tmp (an operator socket's path is limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lab.core_process import CoreProcess
from lab.kamailio import Kamailio, UlContact
from lab.outage import NO_API_LIMITS


class Cluster:
    """Nodes ``a``, ``b``, … (``node_name`` = the letter); ``start()`` starts them one by one (the
    first creates the shared key file), ``close()`` kills whatever still runs and removes the folders."""

    def __init__(self, kam: Kamailio, storage_url: str, *, nodes: int = 3, lease_ttl: float = 3.0,
                 sip_options: dict[str, Any] | None = None, mediator: tuple[str, Path] | None = None) -> None:
        self.kam = kam
        self.root = Path(tempfile.mkdtemp(prefix="sipis-cl-", dir="/tmp"))
        push = ""
        if mediator is not None:
            url, ca_file = mediator
            push = f'[push.mediator]\ntype = "acrobits"\nurl = "{url}"\nca_file = "{ca_file}"\ntimeout = 2\n'
        config = (f"{NO_API_LIMITS}\n"
                  f'[storage]\nurl = "{storage_url}"\nkey_file = "{self.root / "credentials.key"}"\n'
                  f"[cluster]\nlease_ttl = {lease_ttl}\n{push}")
        self.nodes: dict[str, CoreProcess] = {}
        for index in range(nodes):
            name = chr(ord("a") + index)
            workdir = self.root / name
            workdir.mkdir()
            self.nodes[name] = CoreProcess(workdir, sip_options=sip_options, extra_config=config, node_name=name)

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def sipis_bindings(self, users: Iterable[str]) -> dict[str, list[str | None]]:
        """AOR user → the node each of its SIPIS bindings addresses ([]: none; None: no running node).

        Over TCP a node's Contact is the local end of its connection to Kamailio, so the port is
        looked up among each node's sockets. One ``ul.lookup`` per user: kamcmd cannot read a whole
        ``ul.dump`` of a few hundred bindings."""
        ports = {port: name for name, node in self.nodes.items() if node.proc is not None
                 and node.proc.poll() is None for port in local_tcp_ports(node.proc.pid)}

        def node_of(contact: UlContact) -> str | None:
            host_port = contact["contact"].split("@", 1)[-1].split(";", 1)[0]
            port = host_port.rsplit(":", 1)[-1]
            return ports.get(int(port)) if port.isdigit() else None

        return {user: [node_of(c) for c in self.kam.ul_lookup(user) if c["contact"].startswith("sip:sipis-")]
                for user in users}

    def owners(self, via: str = "a") -> dict[str, str | None]:
        """AOR user → owner, from one node's operator API (``GET /v1/instances``, the owner column)."""
        with self.nodes[via].operator() as op:
            page = op.get("/v1/instances", params={"limit": 100_000})
            page.raise_for_status()
            return {row["user"]: row["owner"] for row in page.json()["items"]}

    def node_rows(self, via: str = "a") -> dict[str, dict[str, Any]]:
        """Node name → its row of ``GET /v1/nodes``."""
        with self.nodes[via].operator() as op:
            answer = op.get("/v1/nodes")
            answer.raise_for_status()
            return {row["name"]: row for row in answer.json()["nodes"]}


def local_tcp_ports(pid: int) -> set[int]:
    """Local ports of the IPv4 TCP sockets process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
