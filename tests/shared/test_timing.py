"""The benchmark clock: warm-up, median, and synchronisation points (a fake clock, no sleeping)."""

import pytest

from xclip import timing


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that only moves when `fn` runs: call i of `fn` lasts durations[i] seconds."""
    state = {"now": 0.0, "durations": [], "calls": 0}

    def perf_counter():
        return state["now"]

    def fn():
        state["now"] += state["durations"][state["calls"]]
        state["calls"] += 1

    monkeypatch.setattr(timing.time, "perf_counter", perf_counter)
    return state, fn


def test_median_time_skips_the_warm_up_and_takes_the_median(fake_clock):
    state, fn = fake_clock
    state["durations"] = [100.0, 3.0, 1.0, 2.0]  # a slow first (warm-up) call is never counted
    assert timing.median_time(fn, repeats=3) == 2.0
    assert state["calls"] == 4


def test_once_times_a_single_call(fake_clock):
    state, fn = fake_clock
    state["durations"] = [7.0]
    assert timing.once(fn) == 7.0


def test_cuda_device_synchronises_around_every_timed_call(fake_clock, monkeypatch):
    state, fn = fake_clock
    state["durations"] = [1.0, 1.0, 1.0]
    events = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: events.append(state["calls"]))
    timing.median_time(fn, repeats=2, device="cuda")
    # before and after each of the two timed calls (after the warm-up call 1 and the timed call 2)
    assert events == [1, 2, 2, 3]
    events.clear()
    timing.median_time(lambda: None, repeats=2, device="cpu")
    assert events == []
