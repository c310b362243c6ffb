"""Load shapes: steady, ramp and spike, as pure functions of time (no locust import: importing locust
monkey-patches the whole process with gevent, so these stay testable in a plain pytest run).

Locust runs the first LoadTestShape it finds in a locustfile, and its class picker exists only in the web UI;
so the locustfile has a single shape class (ProfileShape) that calls the profile chosen with `--shape` (default:
the LOAD_SHAPE environment variable, else "steady"). Profiles read locust's own --users/--spawn-rate/--run-time.

    users  ^   steady           ramp                 spike
       u   |  ________          ______            _  __
           | |                /                  | ||  |
     u/4   | |              /           ____ ____| ||  |______
           +------------>  +----------->        +------------>
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

Step = tuple[int, float] | None  # (user count, spawn rate) or None: the test is over


def steady(t: float, users: int, rate: float, duration: float | None) -> Step:
    """`users` for the whole run (a plain locust run)."""
    if duration is not None and t >= duration:
        return None
    return users, rate


def ramp(t: float, users: int, rate: float, duration: float | None) -> Step:
    """From 1 user up to `users` in equal steps over the first 80 % of the run, then hold: where does latency
    start to climb?"""
    duration = duration or 60.0
    if t >= duration:
        return None
    frac = min(1.0, t / (0.8 * duration))
    return max(1, math.ceil(users * frac)), max(rate, users / (0.8 * duration))


def spike(t: float, users: int, rate: float, duration: float | None) -> Step:
    """A quarter of `users` (at least 1), all `users` at once for the middle 20 % of the run, then back: does the
    server queue and recover, or fail?"""
    duration = duration or 60.0
    if t >= duration:
        return None
    base = max(1, users // 4)
    if 0.4 * duration <= t < 0.6 * duration:
        return users, max(rate, float(users))  # the burst arrives within about a second
    return base, max(rate, float(users))


SHAPES: dict[str, Callable[[float, int, float, float | None], Step]] = {
    "steady": steady, "ramp": ramp, "spike": spike}


def shape_name(option: str | None) -> str:
    """The profile to run: the --shape option, else $LOAD_SHAPE, else steady. Unknown names are an error."""
    name = (option or os.environ.get("LOAD_SHAPE") or "steady").strip().lower()
    if name not in SHAPES:
        raise ValueError(f"unknown load shape {name!r}; choose one of {', '.join(SHAPES)}")
    return name
