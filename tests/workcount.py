"""Work measured as a count, for tests that guard against superlinear or unbounded work: the
Python line events a call executes (``sys.settrace``) are the same on every run and every host,
however loaded, where a CPU or wall-clock bound is not. Work done inside C (a sort, a bisect)
is not counted; that is linear-or-better library code, and a test's deadline still catches a
hang there."""
import sys


def line_events(fn, *args, **kwargs):
    """(result of ``fn(*args, **kwargs)``, number of Python line events it executed, in every
    frame it called)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.settrace(old)
    return result, count


def growth(make_input, fn, n: int) -> float:
    """How many times more line events ``fn(make_input(2 * n))`` executes than
    ``fn(make_input(n))``: about 2 for linear work, a little more for n log n, 4 for
    quadratic."""
    _, small = line_events(fn, make_input(n))
    _, large = line_events(fn, make_input(2 * n))
    return large / small
