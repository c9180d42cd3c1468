#!/usr/bin/env python3
"""Where an event's Python goes: the bytecodes one progress() runs, by function.

Counted, not timed, so the figure is the same on a busy host: it loads
sse_demo.py (or the file given) in this process, opens a run with one
stream whose socket takes every byte (no real send: not counted), publishes 50 events of
the built-in job's shape to reach the steady state, then counts the
bytecodes of 20 more with sys.settrace's opcode events. `--floor` counts
the floor's publish of the same event beside it. CPython 3.7 or newer.

    python3 bench/bytecodes.py
    python3 bench/bytecodes.py ../before/sse_demo.py --floor
"""

import argparse
import collections
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
THIS_FILE = os.path.abspath(__file__)
WARM, COUNTED = 50, 20


class TakesAll:
    """A socket that takes every byte at once."""

    def send(self, data):
        return len(data)

    def fileno(self):
        return 99


def load(path, name):
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise SystemExit("%s: not a Python file" % path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(publish_one):
    """{function: bytecodes per call of publish_one}, over COUNTED calls."""
    counts = collections.Counter()

    def tracer(frame, event, arg):
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        code = frame.f_code
        if event == "opcode" and code.co_filename != THIS_FILE:    # not this driver's own
            counts[getattr(code, "co_qualname", None) or            # 3.11 on
                   "%s (line %d)" % (code.co_name, code.co_firstlineno)] += 1
        return tracer
    # CPython 3.12.0 and 3.12.1 give opcode events only once a frame has
    # asked for them under an earlier settrace (python/cpython#114480): a
    # first session that asks, on a call of nothing.
    def primer(frame, event, arg):
        frame.f_trace_opcodes = True
        return primer
    sys.settrace(primer)
    (lambda: None)()
    sys.settrace(None)
    sys.settrace(tracer)
    try:
        for number in range(COUNTED):
            publish_one(WARM + number)
    finally:
        sys.settrace(None)
    if not counts:
        raise SystemExit("no bytecode was counted: this Python gave sys.settrace no opcode events")
    return {name: total / COUNTED for name, total in counts.items()}


def sse_demo_publisher(path):
    demo = load(path, "sse_demo_counted")
    server = demo.SSEServer(demo.Options(port=0))
    session = server.registry.create("counted", {})
    stream = demo._Connection(TakesAll(), ("127.0.0.1", 1), session, 0, True, True)
    server.hub._by_session[session] = {stream: None}
    progress = demo.Progress(session)

    def publish_one(number):
        progress(number, 200, improvement_pct=12.34, dps=10234.5)
        server.hub._last_published[session] = 0.0     # each event as if a tick apart
    return publish_one


def floor_publisher():
    floor = load(os.path.join(HERE, "peers", "floor.py"), "floor_counted")
    run = floor.Run({})
    run.followers[TakesAll()] = 0.0

    def publish_one(number):
        run.publish("progress", {"iteration": number, "total": 200, "percent": 0.5 * number,
                                 "improvement_pct": 12.34, "dps": 10234.5, "elapsed_s": 1.23})
    return publish_one


def report(label, publish_one):
    for number in range(WARM):
        publish_one(number)
    per_function = count(publish_one)
    print("%s: %.0f bytecodes per event" % (label, sum(per_function.values())))
    for name, figure in sorted(per_function.items(), key=lambda item: -item[1]):
        print("  %6.1f  %s" % (figure, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server", nargs="?", default=os.path.join(HERE, "..", "sse_demo.py"),
                        help="the sse_demo.py to count (default: this checkout's)")
    parser.add_argument("--floor", action="store_true", help="count the floor's publish too")
    args = parser.parse_args()
    try:
        publish_one = sse_demo_publisher(args.server)
    except (AttributeError, TypeError) as exc:      # an sse_demo.py of before Options (e206d4c)
        raise SystemExit("%s: not an sse_demo.py this counter knows (%s)" % (args.server, exc))
    report(args.server, publish_one)
    if args.floor:
        report("floor", floor_publisher())


if __name__ == "__main__":
    main()
