"""`python -m service local-directory`: serve the stand-in until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
from collections.abc import Callable

from service.local_directory.app import run_directory
from service.local_directory.options import DirectoryOptions

log = logging.getLogger(__name__)


def _within(kind: type[float], least: float, most: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a number of `kind` from `least` to `most`, named in the error."""

    def number(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a {'whole ' if kind is int else ''}number, got {text!r}"
            ) from None
        if not (least <= value <= most and math.isfinite(value)):
            bounds = f"at least {least}" if most == math.inf else f"{least}-{most}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return number


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of the stand-in."""
    defaults = DirectoryOptions()
    parser = argparse.ArgumentParser(
        prog="python -m service local-directory",
        description="Run a local stand-in of the Hospital Directory API (not the real one).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=_within(int, 0, 65535), default=9000, help="0 picks a free port"
    )
    parser.add_argument(
        "--create-delay",
        type=_within(float, 0),
        default=defaults.create_delay,
        help="seconds per create",
    )
    parser.add_argument(
        "--jitter",
        type=_within(float, 0),
        default=defaults.jitter,
        help="extra random create seconds, up to",
    )
    parser.add_argument("--no-rate-limit", action="store_true", help="turn the rate limits off")
    parser.add_argument(
        "--handlers",
        type=_within(int, 1),
        default=defaults.handlers,
        help="requests handled at once",
    )
    parser.add_argument(
        "--control", action="store_true", help="enable the /_standin/ control surface"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run the stand-in; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    options = DirectoryOptions(
        create_delay=args.create_delay,
        jitter=args.jitter,
        rate_limit=not args.no_rate_limit,
        handlers=args.handlers,
        control=args.control,
    )
    try:
        asyncio.run(_serve(options, args.host, args.port))
    except OSError as exc:
        log.error("Local Hospital Directory stand-in could not start: %s", exc)
        return 1
    return 0


async def _serve(options: DirectoryOptions, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with run_directory(options, host, port) as directory:
        log.info(
            "Local Hospital Directory stand-in (NOT the real directory) listening on %s "
            "(create delay %gs, jitter %gs, rate limits %s, %d handlers, control %s)",
            directory.url,
            options.create_delay,
            options.jitter,
            "on" if options.rate_limit else "off",
            options.handlers,
            "on" if options.control else "off",
        )
        await stop.wait()
    log.info("Local Hospital Directory stand-in stopped")
