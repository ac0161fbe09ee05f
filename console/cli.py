"""``sipis-console console``: the NOC console on this terminal against a running core.

The dispatcher (:mod:`sipis_console.cli`) builds the parser with :func:`add_arguments` and runs
:func:`main`. It also turns ``--config`` into ``--socket`` before: reading the core's config is the
core's business, and this process never loads the core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from console.client import OperatorClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Open the NOC console against a running core through its operator API (unix socket, or "
                          "a URL with a token).")
    parser.add_argument("--socket", type=Path, help="the core's operator socket (default: from --config, "
                                                    "else $SIPIS_OPERATOR_SOCKET)")
    parser.add_argument("--config", "-c", type=Path, metavar="FILE", help="read the socket path from this config")
    parser.add_argument("--url", help="operator API URL (TCP listener); the token comes from $SIPIS_OPERATOR_TOKEN")
    parser.add_argument("--theme", help="Textual theme name (F2 toggles high contrast)")
    parser.add_argument("--utc", action="store_true", help="show times in UTC")
    parser.add_argument("--export-dir", type=Path, metavar="DIR",
                        help="where call traces are written (default: [console] export_dir, else ~/sipis-exports)")
    # the SSH server's child: take the pty on stdin as controlling terminal, so a hang-up ends us
    parser.add_argument("--session-tty", action="store_true", help=argparse.SUPPRESS)


def add_drain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Have a node of the cluster hand its instances over to the other nodes (paced, "
                          "make-before-break), through the operator API of any node.")
    parser.add_argument("node", help="the node's name (node_name in its config)")
    parser.add_argument("--socket", type=Path, help="an operator socket (default: from --config, else "
                                                    "$SIPIS_OPERATOR_SOCKET)")
    parser.add_argument("--config", "-c", type=Path, metavar="FILE", help="read the socket path from this config")
    parser.add_argument("--url", help="operator API URL (TCP listener); the token comes from $SIPIS_OPERATOR_TOKEN")
    parser.add_argument("--no-wait", action="store_true", help="ask for the drain and return at once")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="give up waiting after this long (exit status 1; the drain goes on) (default 600)")


def drain(args: argparse.Namespace) -> int:
    """``drain NODE``: ask, then follow the node's instance count down to zero (progress on stdout)."""
    from console.client import OperatorApiError

    if args.url is None and args.socket is None and not os.environ.get("SIPIS_OPERATOR_SOCKET"):
        print("sipis-console: no core to talk to: give --socket, --config or --url", file=sys.stderr)
        return 2

    async def run() -> int:
        async with _client(args) as client:
            try:
                answer = await client.drain(args.node)
            except OperatorApiError as exc:
                print(f"sipis-console: drain {args.node}: {exc}", file=sys.stderr)
                return 1
            if args.no_wait:
                for node in answer.get("nodes", []):
                    print(f"{node['name']:<24} {node['state']:<9} {node['instances']:>8} instances")
                return 0
            return await _follow_drain(client, args.node, args.timeout)

    return asyncio.run(run())


async def _follow_drain(client: OperatorClient, node: str, timeout: float) -> int:
    """Print how many instances ``node`` still holds whenever it changes, until none (0) or
    ``timeout`` (1: the drain goes on without us)."""
    from console.client import OperatorApiError, Unreachable

    loop = asyncio.get_running_loop()
    deadline, start, last = loop.time() + timeout, None, None
    while loop.time() < deadline:
        try:
            rows = {row["name"]: row for row in (await client.nodes()).get("nodes", [])}
        except (OperatorApiError, Unreachable) as exc:  # the operator's node may be the one draining
            print(f"sipis-console: drain {node}: {exc}", file=sys.stderr)
            return 1
        held = int(rows[node]["instances"]) if node in rows else 0
        start = held if start is None else start
        if held != last:
            print(f"drain {node}: {start - held}/{start} handed over, {held} left", flush=True)
            last = held
        if held == 0:
            print(f"drain {node}: done")
            return 0
        await asyncio.sleep(0.5)
    print(f"sipis-console: drain {node}: still holds {last} instances after {timeout:.0f} s; the drain goes on",
          file=sys.stderr)
    return 1


def _client(args: argparse.Namespace) -> OperatorClient:
    from console.client import OperatorClient

    if args.url is not None:
        return OperatorClient(url=args.url, token=os.environ.get("SIPIS_OPERATOR_TOKEN"))
    return OperatorClient.from_environment(socket_path=args.socket)


def _take_controlling_tty() -> None:
    """Become the pty's session leader and owner, so closing the master sends us SIGHUP."""
    import fcntl
    import termios

    with contextlib.suppress(OSError):  # already a session leader (start_new_session)
        os.setsid()
    with contextlib.suppress(OSError):
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _refusal(client: OperatorClient) -> str | None:
    """Why the core behind ``client`` cannot be used (it is not there, or does not take us), or
    ``None``: said in one line before the screen opens, rather than a screen that says DISCONNECTED."""
    from console.client import OperatorApiError, Unreachable

    try:
        await client.whoami()
    except Unreachable:
        return f"no core answers on {client.address} (is `sipis-console serve` running there?)"
    except OperatorApiError as exc:
        return f"the core on {client.address} refused: {exc}"
    finally:
        await client.aclose()
    return None


def main(args: argparse.Namespace) -> int:
    """Open the console (``args.socket`` already resolved from ``--config`` by the dispatcher)."""
    from console.app import run_console
    from console.feed import OperatorFeed

    if args.session_tty:
        _take_controlling_tty()
    if args.url is None and args.socket is None and not os.environ.get("SIPIS_OPERATOR_SOCKET"):
        print("sipis-console: no core to talk to: give --socket, --config or --url", file=sys.stderr)
        return 2
    # Asked on a client of its own: an httpx client stays bound to the loop it first ran on.
    refusal = asyncio.run(_refusal(_client(args)))
    if refusal is not None:
        print(f"sipis-console: {refusal}", file=sys.stderr)
        return 1
    client = _client(args)
    try:
        return run_console(OperatorFeed(client), theme=args.theme, utc=args.utc, export_dir=args.export_dir)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(client.aclose())
