#!/usr/bin/env python3
"""Which of a server's threads spends its CPU: a wrapper for bench/load.py.

It runs a server file in its own process and, once at least --runs of its
run threads are alive (the sessions scenario's 500 runs), reads each
thread's CPU time (/proc/self/task/<tid>/schedstat: nanoseconds on a CPU,
exact, where the ticks of /proc/.../stat miss threads that run for
microseconds at a time) twice, 10 s apart, and writes the split by kind of
thread to --out. Linux only, standard library only. The window must end
before the runs do: 10 s suits the full size (20 s runs); for --quick
(4 s runs) give --window 1.

    python3 bench/load.py --scenarios sessions \\
        --server 'python3 bench/threads.py --out /tmp/threads.txt sse_demo.py --port {port}'
    python3 bench/load.py --scenarios sessions \\
        --server 'python3 bench/threads.py --out /tmp/floor.txt bench/peers/floor.py --port {port}'

Everything after the server's file is the server's own arguments.
"""

import importlib.util
import os
import sys
import threading
import time

KINDS = ("job", "stream-writer", "runs-feed", "journal", "grip", "notifier", "reporter")


def kind(name):
    """sse_demo names its threads; the floor's run threads run run_job."""
    if "run_job" in name:
        return "job"
    for known in KINDS:
        if name.startswith(known):
            return known
    return "other"


def cpu_by_thread():
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    cpu = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/schedstat" % tid) as f:
                ns = int(f.read().split()[0])
        except OSError:
            continue                          # it ended meanwhile
        cpu[int(tid)] = (names.get(int(tid), "?"), ns / 1e9)
    return cpu


def measure(out, runs, window_s):
    deadline = time.monotonic() + 120
    while sum(kind(t.name) == "job" for t in threading.enumerate()) < runs:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    time.sleep(min(2.0, window_s))            # past the starts
    me = threading.get_native_id()
    before, started = cpu_by_thread(), time.monotonic()
    time.sleep(window_s)
    after, wall = cpu_by_thread(), time.monotonic() - started
    split = {}
    for tid, (name, seconds) in after.items():
        if tid != me:
            part = kind(name)
            split[part] = split.get(part, 0.0) + seconds - before.get(tid, (name, 0.0))[1]
    with open(out, "w") as f:
        f.write("all threads: %.1f %% of a core over %.1f s\n"
                % (100 * sum(split.values()) / wall, wall))
        for part, seconds in sorted(split.items(), key=lambda item: -item[1]):
            f.write("%-14s %5.1f %%\n" % (part, 100 * seconds / wall))


def main():
    args = sys.argv[1:]
    options = {"--out": "threads.txt", "--runs": "400", "--window": "10"}
    while args and args[0] in options and len(args) > 1:
        options[args[0]] = args[1]
        args = args[2:]
    if not args:
        sys.exit(__doc__)
    path = os.path.abspath(args[0])
    window = (options["--out"], int(options["--runs"]), float(options["--window"]))
    threading.Thread(target=measure, args=window, daemon=True, name="sampler").start()
    sys.argv = [path] + args[1:]
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("__main__", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)           # runs its `if __name__ == "__main__"` part


if __name__ == "__main__":
    main()
