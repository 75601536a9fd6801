"""Command line of the Hospital Batch Processor: serve, the local directory, the client, audit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import logs
from service.domain.events import UnknownEventError
from service.settings import Settings, SettingsError, load_settings
from service.store.lock import DatabaseInUse, exclusive
from service.store.migrations import MigrationError, discover

if TYPE_CHECKING:
    from aiohttp import web

    from service.store.records import StoredEvent

log = logging.getLogger(__name__)

EVENTS_PAGE = 500  # events the events command reads in one query
CUT_OFF = (
    "stopped at once by a second signal: work under way was cut off; "
    "the next start takes it up from the log"
)
FEW_OPEN_FILES = 1024  # a limit of open files below this is warned of at start
UNREADABLE = "the log holds an event this code cannot read: upgrade the service"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP service until interrupted."""
    from aiohttp import web

    from service.app import create_app
    from service.web.errors import RefusedRequests
    from service.web.health import QuietProbes

    settings = _settings(args)
    logs.configure(settings.app.log_level)
    logging.getLogger("aiohttp.server").addFilter(RefusedRequests())
    _open_files_to_hard_limit()
    log.info(
        "Hospital Batch Processor starting on http://%s:%d, directory %s, database %s",
        settings.app.host,
        settings.app.port,
        settings.directory.base_url,
        settings.database.path,
    )
    app = create_app(settings)
    app.on_shutdown.insert(0, _exit_on_a_second_signal)
    try:
        _bindable(settings.app.host, settings.app.port)
        web.run_app(
            app,
            host=settings.app.host,
            port=settings.app.port,
            shutdown_timeout=settings.app.shutdown_timeout,
            access_log_class=QuietProbes,
            print=lambda _: log.info(
                "listening on http://%s:%d", settings.app.host, settings.app.port
            ),
            loop=_event_loop(),
        )
    except web.GracefulExit:  # the second signal came before the stop's first step
        log.warning(CUT_OFF)
        return 1
    except socket.gaierror as exc:  # an OSError too, but the message names no setting
        host = settings.app.host
        print(
            f"error: the service could not start: app.host (APP_HOST) {host!r}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    except (DatabaseInUse, OSError) as exc:  # the lock, the address, or the database's folder
        said = str(exc) + (_setting_of(exc, settings) if isinstance(exc, OSError) else "")
        print(f"error: the service could not start: {said}", file=sys.stderr)
        return 2
    except (MigrationError, sqlite3.DatabaseError) as exc:  # corrupt, newer, read-only
        path = settings.database.path
        print(f"error: the service could not start: database {path}: {exc}", file=sys.stderr)
        return 2
    except UnknownEventError as exc:  # an unfinished batch's, read at start
        path = settings.database.path
        print(
            f"error: the service could not start: database {path}: {UNREADABLE}: {exc}",
            file=sys.stderr,
        )
        return 2
    log.info("stopped")
    return 0


def _bindable(host: str, port: int) -> None:
    """Bind every address `host` names, as the server will once started, and let go: an
    address in use or not of this machine then stops the start before it takes up any
    unfinished batch (a restart loop appended events and called the directory each time)."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:  # worded as asyncio's: it names the address
                said = f"error while attempting to bind on address {address!r}"
                raise OSError(exc.errno, f"{said}: {str(exc.strerror).lower()}") from None


def _setting_of(exc: OSError, settings: Settings) -> str:
    """The setting an operator changes for an error of the start: what listens, or the
    database's file and folder (a file beside it, `<path>.lock`, or a folder on its path)."""
    if exc.errno == errno.EADDRINUSE:
        return " (app.port, APP_PORT: stop what listens there, or choose another port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return " (app.host, APP_HOST: an address of this machine, or 0.0.0.0 for every one)"
    if exc.filename is None:
        return ""
    database = os.path.realpath(settings.database.path)
    named = os.path.realpath(exc.filename)
    if named.startswith(database) or database.startswith(named + os.sep):
        if exc.errno == errno.EEXIST and named != database:  # mkdir of a folder on the path
            return f" (database.path, DATABASE_PATH: {exc.filename} is a file, not a folder)"
        if exc.errno == errno.ENOTDIR:
            return f" (database.path, DATABASE_PATH: a folder of {exc.filename} is a file)"
        return " (database.path, DATABASE_PATH)"
    return ""


async def _exit_on_a_second_signal(app: web.Application) -> None:
    """Once a stop has begun, a second SIGTERM or Ctrl-C ends the process at once.

    That is a crash, which the log is made to survive (the next start looks up whatever
    was sent and not recorded). aiohttp's own answer, GracefulExit raised through its
    cleanup, cancelled the cleanup half-way and logged tracebacks of what it left open.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _exit_at_once)


def _exit_at_once() -> None:
    log.warning(CUT_OFF)
    logging.shutdown()  # the warning reaches the log before the process goes
    os._exit(1)


def _open_files_to_hard_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go programs do at start.

    Every connection is a file, and the database writer opens files as it goes: at the
    usual soft limit of 1,024, about 1,000 idle clients made the writer's commits fail
    with "unable to open database file". Linux lets a process raise its own soft limit.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # macOS caps it below an infinite hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files allowed: %s (was %d)", hard, soft)
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < FEW_OPEN_FILES:
        # SQLite's error names the database, not the limit: say which it is beforehand.
        log.warning(
            "open files allowed: %d; each connection takes one, and past the limit requests "
            "fail with 'unable to open database file': raise it (ulimit -n)",
            soft,
        )


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (everywhere but Windows): the service's time goes to
    socket I/O and callbacks, which uvloop runs in C."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def events(args: argparse.Namespace) -> int:
    """Print the event log: a readable timeline, or JSON lines with --json."""
    path = _settings(args).database.path
    if not _is_service_database(path):
        return 2
    try:
        return _print_events(args, path)
    except UnknownEventError as exc:  # printed up to it
        print(f"error: database {path}: {UNREADABLE}: {exc}", file=sys.stderr)
        return 2


def _print_events(args: argparse.Namespace, path: str) -> int:
    from service.domain.batch import stream_id

    with contextlib.closing(sqlite3.connect(_read_only(path), uri=True)) as conn:
        if args.batch:
            known = conn.execute(
                "SELECT 1 FROM events WHERE stream_id = ? LIMIT 1", (stream_id(args.batch),)
            ).fetchall()  # all: a statement left unfinished would keep its snapshot
            if not known:
                print(f"error: the log holds no batch {args.batch}", file=sys.stderr)
                return 2
            where, order = "stream_id = ? AND stream_version > ?", "stream_version"
            params: list[Any] = [stream_id(args.batch), -1 if args.after is None else args.after]
        else:
            where, order, params = "global_position > ?", "global_position", [args.after or 0]
        for event in _paged(conn, where, order, params):
            print(json.dumps(event.to_json()) if args.json else _timeline(event))
    return 0


def _timeline(event: StoredEvent) -> str:
    """One event as a line of the readable timeline; a BatchCreated by its counts alone."""
    data = event.data
    if event.event_type == "BatchCreated":
        details = (
            f"file={data['file_name']!r} rows={len(data['rows'])} "
            f"upstream_batches={len(data['upstream_batches'])}"
        )
    else:
        details = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in data.items()
        )
    # A directory's words (a refusal's message) may hold escape sequences and line breaks:
    # escaped as in the log, they neither act on the terminal nor forge a timeline line.
    return (
        f"{event.recorded_at}  #{event.global_position:<6} {event.stream_id} "
        f"v{event.stream_version:<4} {event.event_type:<22} {details.translate(logs.ESCAPES)}"
    )


def _paged(
    conn: sqlite3.Connection, where: str, order: str, params: list[Any]
) -> Iterator[StoredEvent]:
    """The events `where` selects, whose last parameter is the `order` value to start after,
    read a page at a time: a reader that waits on the output (a pager, a full pipe) then
    holds no snapshot, which would keep every later commit in the WAL meanwhile."""
    from service.store.records import EVENT_COLUMNS, from_row

    page = f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY {order} LIMIT {EVENTS_PAGE}"
    while rows := conn.execute(page, params).fetchall():
        events = [from_row(row) for row in rows]
        yield from events
        params = [*params[:-1], getattr(events[-1], order)]


def rebuild(args: argparse.Namespace) -> int:
    """Replay the log into fresh read models; report, and with --replace, repair."""
    from service.projections.rebuild import rebuild as run

    database = _settings(args).database
    if not _is_service_database(database.path, current=True):
        return 2
    try:
        # Replacing read models under a running service would race its projector.
        with exclusive(database.path) if args.replace else contextlib.nullcontext():
            report = run(database.path, database.busy_timeout_ms, replace=args.replace)
    except DatabaseInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # pages past the log's first unreadable: corrupt
        print(f"error: database {database.path}: {exc}", file=sys.stderr)
        return 2
    except UnknownEventError as exc:  # not "they differ": nothing could be compared
        print(f"error: database {database.path}: {UNREADABLE}: {exc}", file=sys.stderr)
        return 2
    print(report.to_json())
    return 0 if report.equal or report.replaced else 1


def _batch_id(text: str) -> str:
    """A batch id as the log spells it (lower case), from any spelling the API accepts."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch id (a UUID)") from None


def _read_only(path: str) -> str:
    """A read-only SQLite URI for `path`, quoted: a ? # or % in the name is part of it."""
    return f"{Path(path).absolute().as_uri()}?mode=ro"


def _is_service_database(path: str, current: bool = False) -> bool:
    """Whether `path` holds the service's log (`current`: at this code's schema); if not,
    say so on stderr."""
    if not Path(path).is_file():
        print(f"error: no database at {path}", file=sys.stderr)
        return False
    try:
        with contextlib.closing(sqlite3.connect(_read_only(path), uri=True)) as conn:
            conn.execute("SELECT 1 FROM events LIMIT 1").fetchall()
            (version,) = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    except sqlite3.DatabaseError as exc:
        print(f"error: {path} is not a service database ({exc})", file=sys.stderr)
        return False
    expected = len(discover())
    if current and version != expected:
        print(
            f"error: {path} is at schema version {version}, this code's is {expected}: "
            + ("start the service on it once to migrate it" if version < expected else "upgrade"),
            file=sys.stderr,
        )
        return False
    return True


def local_directory(argv: list[str]) -> int:
    """The local stand-in of the Hospital Directory (see its --help)."""
    from service.local_directory.cli import main as run

    return run(argv)


def client(argv: list[str]) -> int:
    """The client of a running service: upload, resume, rollback, follow, results."""
    from service.client import main as run

    return run(argv)


def demo(argv: list[str]) -> int:
    """The local directory and the service, with a sample upload followed live."""
    from service.demo import main as run

    return run(argv)


CLIENT_COMMANDS = ("upload", "resume", "rollback", "follow", "results")


def own_options_first(args: argparse.Namespace) -> int:
    """These commands parse their own options, so they must come first on the line."""
    print(
        f"error: put {args.command} first: python -m service {args.command} [its options]",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        status = _run(sys.argv[1:] if argv is None else argv)
        if sys.stdout is not None:  # None when started with it closed (`>&-`)
            sys.stdout.flush()  # what is still buffered fails here, not at exit (status 120)
        return status
    except KeyboardInterrupt:  # Ctrl-C before the command took it over (its imports), or
        _stdout_to_devnull()  # in the flush above, into a reader that does not read
        return 130
    except BrokenPipeError:  # our reader left (`events | head`): stop, as SIGPIPE would
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except OSError as exc:  # the output cannot be written: `> /dev/full`, a full disk
        # One that names a file (the demo's database folder, a lock) is not the output's.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) or exc.filename:
            raise
        _stdout_to_devnull()
        print(f"error: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 2


def _stdout_to_devnull() -> None:
    """Python flushes stdout again at exit: point it where a write cannot fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(argv: list[str]) -> int:
    if argv[:1] == ["local-directory"]:
        return local_directory(argv[1:])
    if argv[:1] == ["demo"]:
        return demo(argv[1:])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        return client(argv)
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--config", help="settings file (default config.toml, or CONFIG_PATH)")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the HTTP service (the default)")
    commands.add_parser("local-directory", help="run the local directory stand-in")
    commands.add_parser("demo", help="run the directory and the service, upload a sample")
    commands.add_parser("upload", help="upload a CSV to a running service (--follow: live)")
    commands.add_parser("resume", help="retry the failed rows of a batch")
    commands.add_parser("rollback", help="delete a batch's hospitals from the directory")
    commands.add_parser("follow", help="show a batch's live progress until it finishes")
    commands.add_parser("results", help="a batch's per-row results as CSV")
    p = commands.add_parser("events", help="print the audit log")
    p.add_argument("--batch", type=_batch_id, help="only this batch's events")
    p.add_argument("--after", type=int, help="after this stream version (or log position)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a timeline")
    p = commands.add_parser("rebuild", help="replay the log and compare the read models")
    p.add_argument("--replace", action="store_true", help="swap in the rebuilt read models")
    args = parser.parse_args(argv)
    handlers = {"serve": serve, "events": events, "rebuild": rebuild, None: serve}
    handlers |= dict.fromkeys(("local-directory", "demo", *CLIENT_COMMANDS), own_options_first)
    try:
        return handlers[args.command](args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
