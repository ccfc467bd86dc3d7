"""Subcommands beyond ``devices``/``monitor`` (classification, training, rendering, demo)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the ``tarab`` parser."""
