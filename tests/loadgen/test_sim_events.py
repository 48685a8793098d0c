"""The simulator's event loop: time order, ties in scheduling order, and deferred callbacks that run
exactly where the heap would have run them, as far as any `settle()` caller can tell."""

from __future__ import annotations

import random

from loadgen.sim.events import EventLoop


def test_ties_run_in_scheduling_order_and_never_in_the_past() -> None:
    loop = EventLoop()
    seen: list[tuple[str, float]] = []

    def note(name: str) -> None:
        seen.append((name, loop.now))

    def late() -> None:
        note("late")
        loop.at(0.5, note, "past")  # scheduled in the past: runs now, after what is due now

    loop.at(2.0, note, "b")
    loop.at(1.0, late)
    loop.at(1.0, note, "a")
    loop.run()
    assert seen == [("late", 1.0), ("a", 1.0), ("past", 1.0), ("b", 2.0)]
    assert loop.events_run == 4


def _replay(seed: int, lazy: bool) -> tuple[list[tuple[float, int, list[int]]], list[int], int]:
    """Writers (deferrable: they only append to `state`) and readers (settle, then look) at random
    times with many ties; writers' delays are mostly one constant, some shorter (out of FIFO order)."""
    rng = random.Random(seed)
    loop = EventLoop()
    state: list[int] = []
    views: list[tuple[float, int, list[int]]] = []
    writer_times: list[int] = []

    def write(value: int, when: float) -> None:
        assert loop.now == when  # the time it was due, as the heap would have run it
        state.append(value)
        writer_times.append(loop.seq)

    def read(i: int) -> None:
        loop.settle()
        views.append((loop.now, i, list(state)))
        if rng.random() < 0.7:  # readers schedule more work, writers among it
            for _ in range(rng.randint(1, 3)):
                delay = rng.choice([0.0, 0.005, 0.005, 0.005, 0.002])
                when = loop.now + delay
                value = rng.randrange(1000)
                (loop.defer_at if lazy else loop.at)(when, write, value, when)
            loop.after(rng.choice([0.0, 0.001, 0.005, 0.01]), read, i + 1)

    for i in range(20):
        loop.at(rng.choice([0.0, 0.005, 0.01]), read, 100 * i)
    loop.run()
    return views, writer_times, loop.events_run


def test_deferred_callbacks_are_seen_where_the_heap_would_have_run_them() -> None:
    for seed in range(20):
        eager = _replay(seed, lazy=False)
        lazy = _replay(seed, lazy=True)
        assert len(eager[0]) > 30 and len(eager[1]) > 30
        assert lazy == eager  # what readers saw, the seq each writer ran with, the events counted


def test_deferred_callbacks_left_at_the_end_still_run() -> None:
    loop = EventLoop()
    ran: list[float] = []
    loop.at(1.0, lambda: loop.defer_at(3.0, lambda: ran.append(loop.now)))
    loop.run()
    assert ran == [3.0] and loop.now == 3.0 and loop.events_run == 2 and len(loop) == 0


def _chain_replay(seed: int, inline: bool) -> tuple[list[tuple[str, float, int]], int]:
    """Chains of callbacks that each schedule their successor "now" (or later), with ties between
    chains, and readers that settle deferred writes: the order seen, the times and scheduling numbers."""
    rng = random.Random(seed)
    loop = EventLoop()
    seen: list[tuple[str, float, int]] = []

    def step(name: str, left: int) -> None:
        loop.settle()
        seen.append((name, loop.now, loop.seq))
        if rng.random() < 0.3:
            loop.defer_at(loop.now + 0.005, lambda: seen.append(("write", loop.now, loop.seq)))
        if left:
            if rng.random() < 0.5:
                (loop.next_now if inline else lambda fn, *a: loop.at(loop.now, fn, *a))(step, name, left - 1)
            else:
                loop.after(rng.choice([0.001, 0.005]), step, name, left - 1)

    for i in range(8):
        loop.at(rng.choice([0.0, 0.001, 0.005]), step, f"c{i}", 30)
    loop.run()
    return seen, loop.events_run


def test_next_now_runs_a_callback_where_the_heap_would_have_run_it() -> None:
    for seed in range(20):
        assert _chain_replay(seed, inline=True) == _chain_replay(seed, inline=False)


def test_next_now_waits_for_what_is_due_now_and_for_a_bounded_run() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.at(1.0, lambda: loop.next_now(seen.append, "after-b"))
    loop.at(1.0, seen.append, "b")
    loop.run()
    assert seen == ["b", "after-b"]
    bounded = EventLoop()
    bounded.at(0.0, lambda: bounded.next_now(seen.append, "later"))
    bounded.run(max_events=1)  # a bounded run stops where it said, the callback still queued
    assert len(bounded) == 1
