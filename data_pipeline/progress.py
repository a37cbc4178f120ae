"""Progress bars for the long stages: tqdm on stderr, shown on a terminal and hidden otherwise.

``IGPT_PROGRESS=1`` (what ``igpt … --progress`` sets) shows them even when stderr is not a
terminal (a log file, CI); ``IGPT_PROGRESS=0`` hides them everywhere. Child processes inherit it.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from tqdm import tqdm

ENV = "IGPT_PROGRESS"


def forced() -> bool | None:
    """True/False when ``IGPT_PROGRESS`` asks for bars or none, None for the default (terminal only)."""
    value = os.environ.get(ENV, "").strip().lower()
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value)


def bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (never with ``show=False``); ``disable=None`` is tqdm's "off when not a TTY",
    overridden by ``IGPT_PROGRESS``."""
    on = forced() if show else False
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if on is None else not on, **kwargs)
