"""A local stand-in of the Hospital Directory API, faithful to its quirks, for tests and demos."""

from __future__ import annotations

from service.local_directory.app import RunningDirectory, create_directory_app, run_directory
from service.local_directory.options import DirectoryOptions
from service.local_directory.standin import STANDIN_KEY, StandIn

__all__ = [
    "STANDIN_KEY",
    "DirectoryOptions",
    "RunningDirectory",
    "StandIn",
    "create_directory_app",
    "run_directory",
]
