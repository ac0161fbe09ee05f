"""The ``sipis-console`` command line.

``serve`` runs the core headless; ``init`` writes a commented starter config; ``console`` (or no
command at all) opens the NOC console against a running core; ``demo`` runs the core with the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipis-console",
        description="SIP Instance Server (SIPIS) with a live operations console.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the core headless (SIGTERM → clean shutdown)",
                                description="Run the SIPIS core: SIP endpoint, registration engine, "
                                            "HTTPS app API. Logs go to stderr.")
    serve.add_argument("--config", "-c", type=Path, required=True, metavar="FILE", help="the TOML config file")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="override [log] level")

    init = commands.add_parser("init", help="write a commented starter config",
                               description="Write a commented starter config with lab-safe defaults "
                                           "(loopback only) and a random enrolment token.")
    init.add_argument("path", type=Path, nargs="?", default=Path("sipis.toml"), help="where (default sipis.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    console = commands.add_parser("console", help="open the live console on this terminal against a running core",
                                  description="Open the NOC console against a running core through its operator "
                                              "API (unix socket, or a URL with a token).")
    console.add_argument("--socket", type=Path, help="the core's operator socket (default: from --config, "
                                                     "else $SIPIS_OPERATOR_SOCKET)")
    console.add_argument("--config", "-c", type=Path, metavar="FILE", help="read the socket path from this config")
    console.add_argument("--url", help="operator API URL (TCP listener); the token comes from $SIPIS_OPERATOR_TOKEN")
    console.add_argument("--theme", help="Textual theme name (F2 toggles high contrast)")
    console.add_argument("--utc", action="store_true", help="show times in UTC")
    # the SSH server's child: take the pty on stdin as controlling terminal, so a hang-up ends us
    console.add_argument("--session-tty", action="store_true", help=argparse.SUPPRESS)

    demo = commands.add_parser("demo", help="run the core with a simulated lab (PBX, phones, callers, push)",
                               description="Start the real core with a throwaway state folder, the lab PBX, "
                                           "the lab push mediator, simulated apps and callers, all on loopback "
                                           "on free ports. Ctrl+C stops everything cleanly.")
    from lab.demo import add_arguments  # the lab only imports argparse at module level

    add_arguments(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.config, args.log_level)
    if args.command == "init":
        return init(args.path, args.force)
    if args.command == "console":
        return open_console(args)
    if args.command == "demo":
        from lab.demo import main as demo_main

        return demo_main(args)
    if args.command is None and _local_core_known():
        return open_console(parser.parse_args(["console", *(["--config", str(DEFAULT_CONFIG)]
                                                            if DEFAULT_CONFIG.exists() else [])]))
    parser.print_help()
    if args.command is None:
        print(f"\nsipis-console: no running core to open the console on (no ./{DEFAULT_CONFIG} and no "
              "$SIPIS_OPERATOR_SOCKET): start one with `serve`, or try `demo`", file=sys.stderr)
        return 2
    return 0


def _local_core_known() -> bool:
    import os

    return DEFAULT_CONFIG.exists() or bool(os.environ.get("SIPIS_OPERATOR_SOCKET")
                                           or os.environ.get("SIPIS_OPERATOR_URL"))


def _take_controlling_tty() -> None:
    """Become the pty's session leader and owner, so closing the master sends us SIGHUP."""
    import fcntl
    import os
    import termios

    with contextlib.suppress(OSError):  # already a session leader (start_new_session)
        os.setsid()
    with contextlib.suppress(OSError):
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def open_console(args: argparse.Namespace) -> int:
    import asyncio as _asyncio
    import os

    from console.app import run_console
    from console.client import OperatorClient
    from console.feed import OperatorFeed

    if args.session_tty:
        _take_controlling_tty()
    socket_path = args.socket
    if socket_path is None and args.config is not None:
        from sipis.config import ConfigError, load_config  # only here: the console starts faster without it

        try:
            socket_path = load_config(args.config).operator.socket
        except (OSError, ConfigError) as exc:
            print(f"sipis-console: {args.config}: {exc}", file=sys.stderr)
            return 2
    if args.url is None and socket_path is None and not os.environ.get("SIPIS_OPERATOR_SOCKET"):
        print("sipis-console: no core to talk to: give --socket, --config or --url", file=sys.stderr)
        return 2
    if args.url is not None:
        client = OperatorClient(url=args.url, token=os.environ.get("SIPIS_OPERATOR_TOKEN"))
    else:
        client = OperatorClient.from_environment(socket_path=socket_path)
    try:
        return run_console(OperatorFeed(client), theme=args.theme, utc=args.utc)
    finally:
        with contextlib.suppress(Exception):
            _asyncio.run(client.aclose())


def init(path: Path, force: bool) -> int:
    from sipis.config import write_starter_config

    try:
        write_starter_config(path, force=force)
    except FileExistsError:
        print(f"sipis-console: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    print(f"wrote {path} (mode 0600: it holds the enrolment token). Next: sipis-console serve --config {path}")
    return 0


def serve(config_path: Path, log_level: str | None) -> int:
    from sipis.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except FileNotFoundError:
        print(f"sipis-console: no config file at {config_path} (create one with: sipis-console init)",
              file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"sipis-console: {config_path}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=(log_level or config.log.level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=str(config.log.file) if config.log.file else None,
    )
    return asyncio.run(_serve(config))


async def _serve(config: object) -> int:
    from sipis.core import Core  # imported here so `init` and `--help` stay fast

    core = Core(config)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        listening = await core.start()
    except Exception as exc:
        logging.getLogger("sipis").error("start-up failed: %s", exc)
        await core.stop()
        return 1
    log = logging.getLogger("sipis")
    log.info("SIP listening on %s", ", ".join(str(s) for s in listening.sip) or "nothing")
    if listening.api_url:
        log.info("app API on %s", listening.api_url)
    ssh = f"; SSH console {listening.ssh[0]}:{listening.ssh[1]}" if listening.ssh else ""
    print(f"sipis-console: core running (SIP {', '.join(str(s) for s in listening.sip)}; "
          f"API {listening.api_url or 'off'}{ssh})", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("shutting down")
    await core.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
