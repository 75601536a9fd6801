"""A local stand-in of the Hospital Directory API, faithful to its quirks, for tests and demos."""

from .app import RunningDirectory, create_directory_app, run_directory
from .options import DirectoryOptions
from .standin import STANDIN_KEY, StandIn

__all__ = [
    "STANDIN_KEY",
    "DirectoryOptions",
    "RunningDirectory",
    "StandIn",
    "create_directory_app",
    "run_directory",
]
