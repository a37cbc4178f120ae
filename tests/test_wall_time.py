"""The loop's wall-time breakdown: exclusive seconds per phase (nested phases not counted twice), the time spent
producing batches as ``data``, and the rest as ``other``, on a fake clock."""
from __future__ import annotations

import pytest

from igpt.pretrain import wall_time
from igpt.pretrain.wall_time import WallTime


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(wall_time.time, "perf_counter", fake)
    return fake


def test_phases_are_exclusive_and_the_rest_is_other(clock):
    wall = WallTime()

    def batches():
        for _ in range(3):
            clock.advance(0.5)  # reading a batch
            yield "batch"

    loader = wall.timed(batches(), "data")
    for _ in range(3):
        with wall.phase("step"):
            next(loader)
            clock.advance(2.0)  # the step itself
    with wall.phase("validation"):
        clock.advance(4.0)
    clock.advance(1.0)  # between phases
    assert list(loader) == []  # exhausted: producing nothing more costs nothing
    metrics, line = wall.summary()
    assert metrics == {"time_step_s": 6.0, "time_data_s": 1.5, "time_logging_s": 0.0, "time_validation_s": 4.0,
                       "time_samples_s": 0.0, "time_checkpoint_s": 0.0, "time_other_s": 1.0, "time_total_s": 12.5}
    assert line.startswith("wall time 12.5 s: step 48.0% | data 12.0% | logging 0.0% | validation 32.0%")
    assert line.endswith("other 8.0%")


def test_the_logged_line_reads_back_as_seconds_with_the_training_loop(clock):
    wall = WallTime()
    for name, seconds in (("step", 6.0), ("validation", 2.0), ("checkpoint", 1.0), ("data", 0.5)):
        with wall.phase(name):
            clock.advance(seconds)
    clock.advance(0.5)
    _, line = wall.summary()
    log = f"step 10/10 | loss 1.0\n{line}\ncheckpoint done\n"
    seconds = wall_time.read_wall_time(log)
    assert seconds["total"] == pytest.approx(10.0) and seconds["step"] == pytest.approx(6.0)
    assert seconds["other"] == pytest.approx(0.5) and seconds["loop"] == pytest.approx(7.0)
    assert wall_time.read_wall_time("step 10/10 | loss 1.0\n") is None
