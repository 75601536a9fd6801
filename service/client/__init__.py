"""The command-line client: upload a CSV and follow it live, resume, roll back, fetch results."""

from __future__ import annotations

from service.client.cli import main, run

__all__ = ["main", "run"]
