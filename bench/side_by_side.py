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
    python3 bench/side_by_side.py --rounds 5
    python3 bench/side_by_side.py --also 'before=python3 /tmp/old/sse_demo.py --port {port}'

It prints a row per round: each server's CPU over the window, in percent of
one core, then sse_demo's minus the floor's, then each server's CPU divided
by the floor's. Keep the default size or larger: with a few runs each
server takes a percent or two of a core, and the ratios are mostly the
noise of reading /proc in ticks of 10 ms (the script says so).

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
NOISY_PERCENT = 5.0   # below this much of a core, /proc's 10 ms ticks are a large part of it


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Each round prints every server's CPU "
        "in percent of one core over the window, sse_demo's minus the floor's, and every "
        "server's CPU divided by the floor's. Below about 5 % of a core per server (fewer "
        "than 100 runs, or a short window) the ratios are mostly noise.")
    p.add_argument("--runs", type=int, default=150, help="runs on each server (default 150)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, servers started anew (default 3)")
    p.add_argument("--window", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument("--warm", type=float, default=3.0,
                   help="seconds of warm-up: streams read, CPU not counted (default 3)")
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
        if label in dict(args.columns):
            p.error("--also: the label %r is taken; give each server its own" % label)
        try:
            shlex.split(command)
        except ValueError as exc:
            p.error("--also %s: %s" % (label, exc))
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
    others = [label for label in labels if label != "floor"]
    print("%d runs at %d events/s on each server, a stream each; every server on CPU %s at "
          "once; CPU in %% of one core over %g s\n" % (args.runs, 1 / TICK_S, cpu, args.window))
    print("| round | " + " | ".join(labels) + " | sse_demo - floor | " +
          " | ".join("%s / floor" % label for label in others) + " |")
    print("|---" * (len(labels) + len(others) + 2) + "|")
    for number in range(1, args.rounds + 1):
        try:
            cpus = one_round(args, cpu)
        except load.BenchError as exc:
            print("| %d | FAIL: %s |" % (number, exc.args[0]))
            return 1
        shown = {label: round(value, 1) for label, value in cpus.items()}
        print("| %d | %s | %+.1f | %s |" % (
            number, " | ".join("%.1f" % shown[label] for label in labels),
            shown["sse_demo"] - shown["floor"],
            " | ".join("%.2f" % (cpus[label] / cpus["floor"]) if cpus["floor"] else "-"
                       for label in others)), flush=True)
        if cpus["floor"] < NOISY_PERCENT:
            print("\nThe floor took %.1f %% of a core: too little to compare, the ratios are "
                  "mostly noise. Use --runs 150 or more and a window of 10 s." % cpus["floor"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:       # the servers are stopped on the way out (one_round)
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
