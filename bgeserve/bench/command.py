"""CLI registration for the bench area (placeholder until the area lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Adds this area's sub-commands to the `bgeserve` parser."""
