"""Progress bars: shown on a terminal or when asked, hidden otherwise."""
from __future__ import annotations

import io

import pytest

from igpt.data_pipeline.progress import bar


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

