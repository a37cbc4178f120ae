"""Progress reporting: the bars' on/off rule and the training ETA."""
from __future__ import annotations

import io

import pytest

from data_pipeline.progress import bar
from pretrain.eta import format_duration, format_eta


@pytest.mark.parametrize("env, tty, shown", [(None, False, False), (None, True, True), ("1", False, True),
                                              ("0", True, False)])
def test_bars_show_on_a_terminal_or_when_asked(monkeypatch, env, tty, shown):
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", stream)
    if env is None:
        monkeypatch.delenv("IGPT_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("IGPT_PROGRESS", env)
    for _ in bar(range(3), desc="work"):
        pass
    assert ("work" in stream.getvalue()) == shown
    with bar(total=3, desc="hidden", show=False) as b:
        b.update(3)
    assert "hidden" not in stream.getvalue()


def test_eta():
    assert format_eta(0, 100, 5.0) == "ETA --"
    assert format_eta(10, 100, 20.0) == "ETA 3m00s"  # 90 steps at 2 s
    assert format_eta(100, 100, 20.0) == "ETA 0s"
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599, 3600 + 125, 90000)] == \
        ["0s", "1m00s", "1m01s", "59m59s", "1h02m", "1d01h"]
