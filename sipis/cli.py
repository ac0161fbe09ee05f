"""The core's commands of ``sipis-console``: ``serve`` runs the core headless, ``init`` writes a
commented starter config.

The dispatcher (:mod:`sipis_console.cli`) builds the parser: it calls ``add_*_arguments`` for the
command being run, then the command with the parsed arguments; each returns the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the command runs, so ``init`` and ``--help`` stay fast
    from sipis.config import Config


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from sipis.config.model import LOG_LEVELS

    parser.description = "Run the SIPIS core: SIP endpoint, registration engine, HTTPS app API. Logs go to stderr."
    parser.add_argument("--config", "-c", type=Path, default=Path("sipis.toml"), metavar="FILE",
                        help="the TOML config file (default: ./sipis.toml)")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="override [log] level")
    parser.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                        help="run N nodes of one cluster as worker processes (needs [storage] url), named "
                             "NODE_NAME-1…N; worker K listens on every configured port + K-1 (SIP, app API, "
                             "operator TCP, SSH, metrics) and on the operator socket <name>-K.sock; a worker that "
                             "dies is restarted (1 s backoff doubling to 30 s); SIGTERM stops them all (default 1)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return count


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a commented starter config with lab-safe defaults (loopback only) and a random "
                          "enrolment token.")
    parser.add_argument("path", type=Path, nargs="?", default=Path("sipis.toml"), help="where (default sipis.toml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def init(args: argparse.Namespace) -> int:
    from sipis.config import write_starter_config

    path: Path = args.path
    try:
        write_starter_config(path, force=args.force)
    except FileExistsError:
        print(f"sipis-console: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    print(f"wrote {path} (mode 0600: it holds the enrolment token). Next: sipis-console serve --config {path}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from sipis.config import ConfigError, load_config

    config_path: Path = args.config
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"sipis-console: {config_path}: {exc}", file=sys.stderr)
        return 2
    level = args.log_level or config.log.level
    if args.worker is not None:  # one node of ``--workers N``, started by the supervisor
        from sipis.workers import die_with_parent, worker_config

        die_with_parent()
        config = worker_config(config, args.worker)
        configure_logging(level, config.log.file, config.log.format, node=config.node_name)
        return asyncio.run(_serve(config))
    if args.workers > 1:
        if config.storage.url is None:
            print(f"sipis-console: --workers {args.workers} needs [storage] url in {config_path}: the workers are "
                  "nodes of one cluster and share their instances through PostgreSQL (embedded SQLite serves "
                  "one process; run without --workers)", file=sys.stderr)
            return 2
        from sipis.workers import supervise

        configure_logging(level, config.log.file, config.log.format, node="supervisor")

        def worker_argv(index: int) -> list[str]:
            return [sys.executable, "-m", "sipis_console", "serve", "--config", str(config_path),
                    "--log-level", level, "--worker", str(index)]

        return supervise(config, args.workers, worker_argv)
    configure_logging(level, config.log.file, config.log.format)
    return asyncio.run(_serve(config))


#: Libraries whose routine lines (asyncssh: several per SSH login) only a debugging operator wants.
CHATTY_LOGGERS = ("asyncssh",)


def configure_logging(level: str, file: Path | None, form: str = "text", *, node: str | None = None) -> None:
    """The core's log: ``level`` for our own lines; the chatty libraries' INFO lines only at debug;
    ``form`` ``json`` writes one JSON object per record (for log shippers); ``node`` (``--workers``:
    several processes write one log) is in every line (a ``node`` key in JSON)."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler()
    where = f"[{node}] " if node else ""
    handler.setFormatter(JsonFormatter(node) if form == "json"
                         else logging.Formatter(f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


async def _serve(config: Config) -> int:
    from sipis.core import Core

    core = Core(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        listening = await core.start()
    except Exception as exc:
        logging.getLogger("sipis").critical("start-up failed: %s", exc)
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
    await core.hand_over()
    await core.stop()
    log.info("stopped")
    print("sipis-console: core stopped", file=sys.stderr, flush=True)
    return 0



class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and,
    for an exception, ``exception`` (the traceback as text); ``node`` when given."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.node:
            entry["node"] = self.node
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
