"""`python -m service upload|resume|rollback|follow|results`: the service from the command line.

Exit status: 0 the request was done (with --follow: the batch completed, or for rollback,
was rolled back); 1 with --follow, the batch ended otherwise; 2 the service
refused the request (its messages are printed) or could not be reached, or a local file
could not be read; 3 the live progress could not be followed to the end; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.markup import escape
from yarl import URL

from service.client.api import Refused, ServiceApi, problems_of
from service.client.display import (
    Watch,
    known,
    print_table,
    result_table,
    said,
    summary,
    visible,
)
from service.client.follow import LostContact, follow

OK, BATCH_FAILED, REFUSED, LOST, INTERRUPTED = 0, 1, 2, 3, 130
READER_LEFT = 128 + signal.SIGPIPE  # what reads our output stopped (`| head`), as Unix tools
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PATIENCE = 60.0
PIECE = 1 << 16  # characters of results written at a time


def seconds(text: str) -> float:
    """A positive number of seconds, as an option gives it."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


class Output(Console):
    """rich's console; when what reads it leaves, the exit status says so, not a failed batch."""

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()  # further output goes nowhere, then SystemExit(1)
        except SystemExit:
            raise SystemExit(READER_LEFT) from None


def service_url(text: str) -> str:
    """An http:// or https:// address with a host, as --url gives it."""
    try:
        url = URL(text)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def batch_id(text: str) -> str:
    """A batch id as the service spells it, from any spelling it accepts (a UUID).

    Anything else would be a path of its own: `follow ..` asked for /batch/../ws, which is
    the dashboard's /ws, and waited on it silently forever.
    """
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch id (a UUID)") from None


def idempotency_key(text: str) -> str:
    """A key that fits in a header: no line breaks or other control characters."""
    if any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in text):
        raise argparse.ArgumentTypeError(
            f"expected a key without line breaks or control characters, got {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The client's commands; --url and --reconnect-timeout can also come from the environment."""
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Client of a running Hospital Batch Processor.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        type=service_url,
        default=os.environ.get("SERVICE_URL", DEFAULT_URL),
        help="the service's base URL (SERVICE_URL; default %(default)s)",
    )
    patience = argparse.ArgumentParser(add_help=False)
    patience.add_argument(
        "--reconnect-timeout",
        type=seconds,
        default=os.environ.get("SERVICE_RECONNECT_TIMEOUT", str(DEFAULT_PATIENCE)),
        metavar="SECONDS",
        help="give up following after this long without contact "
        "(SERVICE_RECONNECT_TIMEOUT; default %(default)s)",
    )
    # Parents share their actions: a default set on one command's --follow would be
    # every command's, so `follow`, which always follows, has no --follow at all.
    following = argparse.ArgumentParser(add_help=False, parents=[patience])
    following.add_argument(
        "--follow", action="store_true", help="show live progress until the batch finishes"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("upload", parents=[common, following], help="upload a CSV of hospitals")
    p.add_argument("file", type=Path, help="CSV with header name,address,phone")
    p.add_argument(
        "--idempotency-key",
        type=idempotency_key,
        help="the same key and file never make a second batch",
    )
    p = commands.add_parser(
        "resume", parents=[common, following], help="retry a finished batch's failed rows"
    )
    p.add_argument("batch_id", type=batch_id)
    p = commands.add_parser(
        "rollback", parents=[common, following], help="delete a batch's hospitals upstream"
    )
    p.add_argument("batch_id", type=batch_id)
    p = commands.add_parser(
        "follow", parents=[common, patience], help="show a batch's live progress to its end"
    )
    p.set_defaults(follow=True)
    p.add_argument("batch_id", type=batch_id)
    p = commands.add_parser("results", parents=[common], help="every row's result as CSV")
    p.add_argument("batch_id", type=batch_id)
    p.add_argument("--only", choices=["failed"], help="only the failed rows, in upload format")
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    return parser


async def run(argv: list[str], out: Console | None = None, err: Console | None = None) -> int:
    """Run one client command; the exit status."""
    args = build_parser().parse_args(argv)
    out = out or Output()
    err = err or Output(stderr=True)
    for console in (out, err):
        console.soft_wrap = not console.is_terminal  # a log line is never cut in two
    try:
        async with aiohttp.ClientSession() as http:
            api = ServiceApi(http, URL(args.url))
            return await COMMAND_RUNNERS[args.command](api, args, out)
    except Refused as exc:
        err.print(f"[red]error:[/] {escape(visible(exc.summary))}")
        for problem in exc.problems:
            err.print(f"  {escape(visible(problem))}")
        return REFUSED
    except LostContact as exc:
        err.print(f"[red]error:[/] lost the live progress: {escape(visible(str(exc)))}")
        return LOST


async def _upload(api: ServiceApi, args: argparse.Namespace, out: Console) -> int:
    batch, replayed = await api.upload(args.file, args.idempotency_key)
    out.print(
        f"Batch [bold]{batch['batch_id']}[/] accepted: "
        f"{escape(said(batch.get('total_hospitals')))} hospital(s) from {escape(args.file.name)}"
    )
    if replayed:  # nothing is loaded again: that batch may even have been rolled back
        out.print(
            "This file was uploaded with this --idempotency-key before: this is that batch, "
            "and nothing new is created (a new key loads the file again)."
        )
    for warning in problems_of(batch.get("warnings")):  # each "loc: msg", as a refusal's
        out.print(f"[yellow]warning:[/] {escape(visible(warning))}")
    return await _then_follow(api, batch["batch_id"], args, out)


async def _lifecycle(api: ServiceApi, args: argparse.Namespace, out: Console) -> int:
    """`resume` or `rollback`: ask, print where the batch is, and follow it if asked to."""
    ask = api.resume if args.command == "resume" else api.rollback
    progress = await ask(args.batch_id)
    out.print(f"Batch {args.batch_id}: {escape(visible(known(progress.get('current_message'))))}")
    return await _then_follow(api, args.batch_id, args, out)


async def _follow_only(api: ServiceApi, args: argparse.Namespace, out: Console) -> int:
    return await _then_follow(api, args.batch_id, args, out)


async def _results(api: ServiceApi, args: argparse.Namespace, out: Console) -> int:
    text = await api.results_csv(args.batch_id, only_failed=args.only == "failed")
    if args.output is None:
        if sys.stdout.isatty():  # to be read there: a value's escape sequence must not act
            text = visible(text.replace("\r\n", "\n"))
        # In pieces: a reader that leaves during one large write cuts it short unnoticed,
        # and the next piece says so (BrokenPipeError: 141, as for `events | head`).
        for start in range(0, len(text), PIECE):
            sys.stdout.write(text[start : start + PIECE])
        sys.stdout.flush()
    else:
        try:
            await asyncio.to_thread(args.output.write_text, text, encoding="utf-8", newline="")
        except OSError as exc:
            raise Refused(f"cannot write {args.output}: {exc.strerror}") from exc
        out.print(f"Wrote the results of batch {args.batch_id} to {escape(str(args.output))}")
    return OK


async def _then_follow(
    api: ServiceApi, batch_id: str, args: argparse.Namespace, out: Console
) -> int:
    """With --follow, show the batch live to its end and its results; the exit status.

    A batch ends well when it completed, or for `rollback`, when it was rolled back.
    """
    # The commands printed are never broken over lines (soft_wrap): pasted, they must run.
    if not args.follow:
        out.print(
            f"Follow it: python -m service follow {batch_id} --url {escape(args.url)}",
            soft_wrap=True,
        )
        return OK
    try:
        with Watch(out, await api.creates_per_minute(args.reconnect_timeout)) as watch:
            final = await follow(
                api, batch_id, watch.show, watch.note, args.reconnect_timeout, watch.aside
            )
    except asyncio.CancelledError:
        out.print(
            f"Stopped following batch {batch_id}; this does not stop the batch. "
            f"Follow it again: python -m service follow {batch_id} --url {escape(args.url)}",
            soft_wrap=True,
        )
        raise
    status: dict[str, Any] = final["status"]
    table, left_out = result_table(status)
    if table.row_count:
        print_table(out, table)
    if left_out:
        out.print(
            f"{left_out} of the {escape(said(status.get('total_hospitals')))} rows are not "
            f"listed here. All of them: python -m service results {batch_id} "
            f"--url {escape(args.url)} "
            "-o results.csv",
            soft_wrap=True,
        )
    out.print(summary(status))
    # Why, and what to do, off the bar: also for a completed batch whose rollback the
    # directory refused (it stays completed, and rollback exits 1).
    completed = status.get("processing_status") == "completed"
    why = final["progress"].get("current_message")
    if why and (not completed or status.get("rollback_error")):
        out.print(escape(visible(str(why))), highlight=False)
    if args.command == "rollback":
        return OK if status.get("rolled_back") else BATCH_FAILED
    return OK if completed else BATCH_FAILED


COMMAND_RUNNERS = {
    "upload": _upload,
    "resume": _lifecycle,
    "rollback": _lifecycle,
    "follow": _follow_only,
    "results": _results,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the client commands."""
    # An output encoding that cannot write a name (PYTHONIOENCODING=latin-1) shows what it
    # cannot as escapes, as stderr does, rather than ending in a traceback.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(run(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return INTERRUPTED
