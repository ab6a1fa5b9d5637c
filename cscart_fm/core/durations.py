"""Durations as people read them, in support's pages and in the jobs' own words."""

from __future__ import annotations

from datetime import timedelta


def describe_age(delta: timedelta) -> str:
    """``45 s``, ``12 min``, ``3 h 5 min``, ``4 days``."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min" if minutes % 60 else f"{hours} h"
    return f"{hours // 24} days"
