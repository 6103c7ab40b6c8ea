"""Command-line subcommands of this part (placeholder until the part lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add this part's subcommands to the ``visionrpc`` parser."""
