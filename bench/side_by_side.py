#!/usr/bin/env python3
"""Many runs at once, side by side: servers measured in the same window, on
the same CPU.

bench/load.py measures one server after another, so a host whose speed
drifts (a shared virtual machine) moves each figure by more than the
servers differ: the floor alone took from 20 % to 31 % of a core for the
same sessions scenario, minutes apart. Here every server runs the sessions
load at once, pinned to the same CPU, and their CPU time is read over the
same window: the drift falls on each alike, and the ratio between them is
what is left. The load per server is smaller (150 runs, not 500), so that
all of them together stay well under one core; at 500 runs the points above
the floor are about 500/150 times the ones shown.

    python3 bench/side_by_side.py                         # sse_demo and the floor, 3 rounds
    python3 bench/side_by_side.py --rounds 5 --runs 100
    python3 bench/side_by_side.py --also 'before=python3 /tmp/old/sse_demo.py --port {port}'

Standard library only, Linux (/proc, taskset), loopback only. Every server
it starts is stopped (SIGTERM, then SIGKILL) on every way out.
"""

import argparse
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the bench's own server, client and stream loop)

TICK_S = 0.1          # each run publishes 10 events a second, as in load.py's sessions


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=150, help="runs on each server (default 150)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, servers started anew (default 3)")
    p.add_argument("--window", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument("--warm", type=float, default=3.0,
                   help="seconds read before the window opens (default 3)")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=COMMAND",
                   help="one more server, {port} filled in; repeatable")
    args = p.parse_args(argv)
    args.columns = [("sse_demo", load.DEFAULT_SERVER),
                    ("floor", "%s %s --port {port}" % (shlex.quote(sys.executable), shlex.quote(
                        os.path.join(load.PEERS_DIR, "floor.py"))))]
    for item in args.also:
        label, _, command = item.partition("=")
        if not label or "{port}" not in command:
            p.error("--also takes LABEL=COMMAND, the command with {port}: %r" % item)
        args.columns.append((label, command))
    return args


def one_round(args, cpu):
    """{label: server CPU % over the window}, every server under the same load at once."""
    servers, loop = [], load.Loop()
    try:
        for _, template in args.columns:
            servers.append(load.Server(template, "plain", None, cpu))
        iterations = int((args.warm + args.window + 10) / TICK_S)
        streams = []
        for server in servers:
            sids = [server.client.start(iterations=iterations, tick=TICK_S, update_every=1)[0]
                    for _ in range(args.runs)]
            streams += load.open_streams(server.client, sids, loop)
        loop.run(lambda: False, args.warm)
        before = [server.stats()[0] for server in servers]
        opened = time.monotonic()
        loop.run(lambda: False, args.window)
        elapsed = time.monotonic() - opened
        after = [server.stats()[0] for server in servers]
        failed = [s.error for s in streams if s.error is not None]
        if failed:
            raise load.BenchError("%d streams failed, the first: %s" % (len(failed), failed[0]))
        return {label: 100.0 * (a - b) / elapsed
                for (label, _), b, a in zip(args.columns, before, after)}
    finally:
        loop.close()
        for server in servers:
            server.stop()


def main(argv=None):
    args = parse_args(argv)
    load.raise_open_file_limit()
    cpu, _ = load.pick_cpus()
    labels = [label for label, _ in args.columns]
    print("%d runs at %d events/s on each server, a stream each; server CPU %% over %g s, "
          "every server on CPU %s at once\n" % (args.runs, 1 / TICK_S, args.window, cpu))
    print("| round | " + " | ".join(labels) + " | sse_demo - floor | sse_demo / floor |")
    print("|---" * (len(labels) + 3) + "|")
    for number in range(1, args.rounds + 1):
        try:
            cpus = one_round(args, cpu)
        except load.BenchError as exc:
            print("| %d | FAIL: %s |" % (number, exc.args[0]))
            return 1
        print("| %d | %s | %+.1f | %.2f |" % (
            number, " | ".join("%.1f" % cpus[label] for label in labels),
            cpus["sse_demo"] - cpus["floor"], cpus["sse_demo"] / cpus["floor"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
