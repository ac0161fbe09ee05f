"""The ``sipis-console`` command line: one parser; each command runs in the layer that owns it.

``serve`` and ``init`` are the core's (:mod:`sipis.cli`), ``console`` is the console's
(:mod:`console.cli`), ``demo`` the lab's (:mod:`lab.demo`). This module knows only their names and
one-line help. A command's module is imported when that command is on the command line (its
description and options are added then), so ``--help`` and ``init`` stay fast and the console process
never loads the core or the lab. No command at all opens the console when a local core is known.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_CONFIG = Path("sipis.toml")

EXAMPLES = """\
examples:
  sipis-console init sipis.toml          write a starter config (loopback only, random enrol token)
  sipis-console serve --config sipis.toml
                                         run the core: SIP, app API, registrations (Ctrl+C / SIGTERM stops)
  sipis-console console --config sipis.toml
                                         the live console against that running core (a bare
                                         sipis-console does the same with ./sipis.toml)
  ssh -p 2222 noc@HOST                   the same console over SSH ([ssh] listen + [[ssh.operators]])
  sipis-console demo                     the core + lab PBX, phones, callers and push mediator on loopback
  sipis-console demo --headless --duration 60 --apps 100 --call-rate 2 --seed 1 --json
                                         the same without the console; prints a summary (one JSON line)
"""


def _owned(ref: str) -> Callable[..., Any]:
    """``module:function``, imported on the first call."""
    module, _, name = ref.partition(":")

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


def _socket_from_config(args: argparse.Namespace) -> int:
    """``--config`` → ``--socket`` (reading the core's config is the core's business); told
    nothing, ``./sipis.toml`` as ``serve`` does. 2 when the config cannot be read, else 0."""
    told_nothing = args.socket is None and args.config is None and getattr(args, "url", None) is None
    if told_nothing and not _core_in_environment() and DEFAULT_CONFIG.exists():
        args.config = DEFAULT_CONFIG
    if args.socket is None and args.config is not None:
        from sipis.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except (OSError, ConfigError) as exc:
            print(f"sipis-console: {args.config}: {exc}", file=sys.stderr)
            return 2
        args.socket = config.operator.socket
        if hasattr(args, "export_dir"):
            args.export_dir = args.export_dir or config.console.export_dir
    return 0


def open_console(args: argparse.Namespace) -> int:
    """``console``: the core reads its config (``--config`` → the socket), then the console runs
    with the socket alone."""
    if _socket_from_config(args):
        return 2
    from console.cli import main as console_main

    return console_main(args)


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from sipis.config.model import package_version

        print(f"sipis-console {package_version()}")
        parser.exit(0)


class Command(NamedTuple):  # not a dataclass: that import alone costs --help ~10 ms
    help: str
    #: the owner's: sets the command's description and adds its options
    arguments: Callable[[argparse.ArgumentParser], None]
    #: runs the command with the parsed arguments; returns the exit status
    run: Callable[[argparse.Namespace], int]


COMMANDS = {
    "serve": Command("run the core headless (SIGTERM → clean shutdown)",
                     _owned("sipis.cli:add_serve_arguments"), _owned("sipis.cli:serve")),
    "init": Command("write a commented starter config",
                    _owned("sipis.cli:add_init_arguments"), _owned("sipis.cli:init")),
    "console": Command("open the live console on this terminal against a running core",
                       _owned("console.cli:add_arguments"), open_console),
    "drain": Command("hand a cluster node's instances over to the other nodes",
                     _owned("console.cli:add_drain_arguments"),
                     lambda args: _socket_from_config(args) or _owned("console.cli:drain")(args)),
    "demo": Command("run the core with a simulated lab (PBX, phones, callers, push)",
                    _owned("lab.demo:add_arguments"), _owned("lab.demo:main")),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command in the list; the description and options of ``command`` only."""
    parser = argparse.ArgumentParser(
        prog="sipis-console",
        description="SIP Instance Server (SIPIS) with a live operations console.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in COMMANDS.items():
        sub = commands.add_parser(name, help=entry.help)
        if name == command:
            entry.arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the command is the first argument that is no option (the top level has only --help and --version)
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is not None:
        return COMMANDS[args.command].run(args)
    if _local_core_known():
        return main(["console", *(["--config", str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.exists() else [])])
    parser.print_help()
    print(f"\nsipis-console: no running core to open the console on (no ./{DEFAULT_CONFIG} and no "
          "$SIPIS_OPERATOR_SOCKET): start one with `serve`, or try `demo`", file=sys.stderr)
    return 2


def _local_core_known() -> bool:
    return DEFAULT_CONFIG.exists() or _core_in_environment()


def _core_in_environment() -> bool:
    return bool(os.environ.get("SIPIS_OPERATOR_SOCKET") or os.environ.get("SIPIS_OPERATOR_URL"))

