#!/usr/bin/env python3
"""Runs reported from elsewhere: how fast one reporter pushes, and how late
its events reach a viewer.

Standard library only; traffic on loopback only. Each measurement starts
its own server (sse_demo.py in a subprocess, on a free port).

  push      one reporter, one connection: N events (default 200,000:
            progress with a field, a log line every 10th) as fast as it
            can, in batches. Two ways: sse_demo.Reporter, the Python API
            (its progress() calls, its batching thread, the server), and
            raw POSTs of pre-built 1,000-event batches (the server's intake
            alone). Target: 20,000 events/s.
  delay     `sse_demo.py report URL -- PROGRAM`, PROGRAM printing a JSON
            progress line with its own time.time() 100 times a second for
            S seconds (default 20); a viewer on the run's stream takes each
            event's delay from that print to its arrival. Target: p99
            under 50 ms.

    python3 bench/report.py                  # both, full size
    python3 bench/report.py --quick          # 20,000 events, 5 s
"""

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import sse_demo  # noqa: E402  (the file beside bench/)

SSE_DEMO = os.path.join(HERE, "..", "sse_demo.py")

PRINTER = r'''
import json, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
count = int(rate * seconds)
start = time.monotonic()
for i in range(count):
    pause = start + i / rate - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    print(json.dumps({"done": i + 1, "total": count, "sent": time.time()}), flush=True)
'''


class Server:
    """sse_demo.py in a subprocess on a free port."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, SSE_DEMO, "--port", str(self.port),
                                      "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        self.url = "http://127.0.0.1:%d/" % self.port

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def cpu_s(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def events_of(count):
    for step in range(count):
        if step % 10 == 9:
            yield {"event": "log", "message": "step %d: a line a training script prints" % step}
        else:
            yield {"event": "progress", "done": step, "total": count, "loss": 1.0 / (step + 1)}


def push_with_reporter(count):
    server = Server()
    try:
        cpu = server.cpu_s()
        started = time.monotonic()
        reporter = sse_demo.Reporter(server.url, title="push")
        with reporter as progress:
            for step in range(count):
                if step % 10 == 9:
                    progress.log("step %d: a line a training script prints" % step)
                else:
                    progress(step, count, loss=1.0 / (step + 1))
        took = time.monotonic() - started
        _, status = server.request("GET", "/status/" + reporter.run_id)
        assert status["state"] == "complete", status
        return {"events": count, "seconds": took, "events/s": count / took,
                "server CPU s": server.cpu_s() - cpu}
    finally:
        server.stop()


def push_raw(count, batch=1000):
    server = Server()
    try:
        _, opened = server.request("POST", "/runs", b"{}", {"Content-Type": "application/json"})
        items = list(events_of(count))
        bodies = [json.dumps({"seq": i, "events": items[i:i + batch]}).encode()
                  for i in range(0, count, batch)]
        headers = {"Authorization": "Bearer " + opened["report_key"],
                   "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        cpu = server.cpu_s()
        started = time.monotonic()
        for body in bodies:
            conn.request("POST", opened["events"], body=body, headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
        took = time.monotonic() - started
        conn.close()
        assert answer["received"] == count, answer
        return {"events": count, "seconds": took, "events/s": count / took,
                "server CPU s": server.cpu_s() - cpu}
    finally:
        server.stop()


def read_stream(port, path):
    """(arrival time, event data) of each progress event, until the end."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(("GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
    buffer, seen = b"", []
    while True:
        data = sock.recv(65536)
        now = time.time()
        if not data:
            break
        buffer += data
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            if b"event: progress" in block:
                line = re.search(rb"^data: (.*)$", block, re.M).group(1)
                seen.append((now, json.loads(line)))
            if re.search(rb"^event: (complete|error|cancelled)$", block, re.M):
                sock.close()
                return seen
    sock.close()
    return seen


def delay(rate, seconds):
    server = Server()
    try:
        reporter = subprocess.Popen(
            [sys.executable, SSE_DEMO, "report", server.url, "--", sys.executable, "-c",
             PRINTER, str(rate), str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        runs = []
        while not runs and time.monotonic() < deadline:
            runs = server.request("GET", "/runs")[1]["runs"]
            time.sleep(0.01)
        seen = read_stream(server.port, runs[0]["stream"])
        reporter.wait(seconds + 30)
        delays = sorted(1000 * (arrived - data["sent"]) for arrived, data in seen
                        if "sent" in data)
        pick = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]
        return {"events": len(delays), "p50 ms": pick(0.5), "p99 ms": pick(0.99),
                "max ms": delays[-1]}
    finally:
        server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--events", type=int, help="push: events (default 200,000)")
    p.add_argument("--seconds", type=float, help="delay: seconds (default 20)")
    p.add_argument("--only", choices=["push", "delay"])
    args = p.parse_args()
    count = args.events or (20000 if args.quick else 200000)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    rows = []
    if args.only in (None, "push"):
        rows.append(("push, Reporter (Python API)", push_with_reporter(count)))
        rows.append(("push, raw POSTs of 1,000", push_raw(count)))
    if args.only in (None, "delay"):
        rows.append(("delay at 100 events/s, `report -- PROGRAM`", delay(100, seconds)))
    print("python %s" % sys.version.split()[0])
    for name, figures in rows:
        print("%-45s %s" % (name, "  ".join(
            "%s %s" % (k, ("{:,.0f}".format(v) if v >= 100 else "%.2f" % v)
                       if isinstance(v, float) else "{:,}".format(v))
            for k, v in figures.items())))


if __name__ == "__main__":
    main()
