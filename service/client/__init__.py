"""The command-line client: upload a CSV and follow it live, resume, roll back, fetch results."""

from service.client.cli import main, run

__all__ = ["main", "run"]
