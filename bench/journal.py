#!/usr/bin/env python3
"""The journal's disk work and a read-back record's memory (--state-dir).

Standard library only, Linux (it reads /proc), traffic on loopback only.
Two measurements, each on a fresh server in a subprocess:

  writes   one run of N events (default 1,000,000: progress every step, a
           log line every --log-every steps) with --state-dir: the bytes the
           server wrote to disk while it ran (/proc/<pid>/io write_bytes)
           against the run's final file size. Target: at most 3x.
  export   a journal of M MB (default 500) made on disk, read back by a
           server at start; GET /export of it, read to the end, while the
           server's resident memory is sampled. Target: growth under 50 MB.

    python3 bench/journal.py                     # both, full size
    python3 bench/journal.py --quick             # 100,000 events, 50 MB
    python3 bench/journal.py --only writes --events 200000 --log-every 1
"""

import argparse
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SSE_DEMO = os.path.join(HERE, "..", "sse_demo.py")

JOB = '''
def flood(progress, events=1000000, log_every=10):
    """`events` events as fast as the server takes them: progress every
    step, and a log line every `log_every` steps (each counts as one)."""
    step = sent = 0
    while sent < events:
        progress(step, events, loss=1.0 / (step + 1))
        sent += 1
        if log_every and step % log_every == 0 and sent < events:
            progress.log("step %d: a line of the kind a training script prints" % step)
            sent += 1
        step += 1
'''


class Server:
    """sse_demo.py in a subprocess on a free port."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, SSE_DEMO, "--port", "0", "--log-level", "warning"] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            env=dict(os.environ, **(env or {})))
        line = self.proc.stdout.readline()
        match = re.search(r":(\d+)/", line)
        if not match:
            self.stop()
            raise SystemExit("the server did not start: %r %s" % (line, self.proc.stderr.read()))
        self.port = int(match.group(1))

    def request(self, method, path, body=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body and json.dumps(body), headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def status(self, sid):
        return json.loads(self.request("GET", "/status/" + sid)[1])["state"]

    def proc_field(self, name, field):
        with open("/proc/%d/%s" % (self.proc.pid, name)) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise SystemExit("timed out waiting for " + what)


def measure_writes(events, log_every):
    folder = tempfile.mkdtemp(prefix="sse-journal-bench-")
    try:
        with open(os.path.join(folder, "bench_job.py"), "w") as f:
            f.write(JOB)
        state = os.path.join(folder, "state")
        server = Server("--state-dir", state, "--job", "bench_job:flood",
                        "--max-record-mb", "1", env={"PYTHONPATH": folder})
        try:
            before = server.proc_field("io", "write_bytes")
            started = time.monotonic()
            status, body = server.request("POST", "/start",
                                          {"events": events, "log_every": log_every})
            assert status == 201, body
            sid = json.loads(body)["session_id"]
            path = os.path.join(state, sid + ".jsonl")
            wait_until(lambda: server.status(sid) != "running", 3600, "the run to end")
            took = time.monotonic() - started

            def journal_done():       # the run's end, and what follows it, written
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 2 ** 20))
                    tail = f.read().rstrip(b"\n").rsplit(b"\n", 3)[1:]
                return any(b',"event":"complete"' in line[:40] for line in tail) and \
                    tail[-1].startswith((b'{"series"', b'{"history"'))
            wait_until(journal_done, 60, "the journal to write the run's end")
            os.sync()
            written = server.proc_field("io", "write_bytes") - before
            size = os.path.getsize(path)
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"events": events, "log_every": log_every, "seconds": round(took, 1),
            "file_mb": round(size / 2 ** 20, 2), "written_mb": round(written / 2 ** 20, 2),
            "ratio": round(written / size, 2), "target": "<= 3"}


def make_journal(folder, megabytes):
    """A finished run's journal of about `megabytes` MB, as the server writes
    one: header, id mark, progress once a second's worth, log lines, the
    terminal event, the series and the held history. Its session id."""
    sid = secrets.token_urlsafe(16)
    now = time.time()
    header = {"format": "sse_demo-journal", "version": 1, "session_id": sid,
              "title": "bench", "params": {}, "started_ts": now - 3600,
              "view_key": secrets.token_urlsafe(16), "control_key": secrets.token_urlsafe(16),
              "queued": False}
    target = megabytes * 2 ** 20
    message = "a log line of the kind a build prints, padded to a usual length " * 3
    with open(os.path.join(folder, sid + ".jsonl"), "w") as f:
        f.write(json.dumps(header, separators=(",", ":")) + "\n")
        f.write('{"ids":%d}\n' % 10 ** 9)
        event_id, size = 0, 0
        while size < target:
            event_id += 1
            if event_id % 1000 == 0:
                data = {"iteration": event_id, "total": 10 ** 9, "percent": 1.0,
                        "elapsed_s": 1.0, "ts": now - 60}
                name = "progress"
            else:
                data = {"message": "%d %s" % (event_id, message), "level": "info",
                        "elapsed_s": 1.0, "ts": now - 60}
                name = "log"
            line = '{"id":%d,"event":"%s","data":%s}\n' % (
                event_id, name, json.dumps(data, separators=(",", ":")))
            f.write(line)
            size += len(line)
        f.write('{"id":%d,"event":"complete","data":{"ts":%r}}\n' % (event_id + 1, now - 30))
        f.write('{"series":{"width":1,"last_id":%d,"buckets":[]}}\n' % (event_id + 1))
        f.write('{"history":[]}\n')
    return sid, event_id + 1


def measure_export(megabytes, path="/export/"):
    folder = tempfile.mkdtemp(prefix="sse-export-bench-")
    try:
        sid, lines = make_journal(folder, megabytes)
        started = time.monotonic()
        server = Server("--state-dir", folder, "--session-ttl", "86400")
        try:
            load_s = time.monotonic() - started
            time.sleep(1.0)                                    # settle
            base = server.proc_field("status", "VmRSS")
            peak = [base]
            done = threading.Event()

            def sample():
                while not done.wait(0.05):
                    peak[0] = max(peak[0], server.proc_field("status", "VmRSS"))
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            started = time.monotonic()
            conn.request("GET", path + sid)
            response = conn.getresponse()
            assert response.status == 200, response.status
            received = got_lines = 0
            while True:
                piece = response.read(1 << 20)
                if not piece:
                    break
                received += len(piece)
                got_lines += piece.count(b"\n")
            took = time.monotonic() - started
            conn.close()
            done.set()
            sampler.join()
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"path": path.strip("/"), "journal_mb": megabytes, "lines": got_lines,
            "expected_lines": lines, "sent_mb": round(received / 2 ** 20, 1),
            "start_s": round(load_s, 1), "seconds": round(took, 1),
            "mb_per_s": round(received / 2 ** 20 / took, 1),
            "rss_base_mb": round(base / 1024, 1),
            "rss_growth_mb": round((peak[0] - base) / 1024, 1), "target": "< 50"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100,000 events and a 50 MB journal")
    p.add_argument("--only", choices=["writes", "export"])
    p.add_argument("--events", type=int)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--journal-mb", type=int)
    p.add_argument("--json", metavar="FILE", help="also keep the report here")
    args = p.parse_args()
    events = args.events or (100000 if args.quick else 1000000)
    megabytes = args.journal_mb or (50 if args.quick else 500)
    report = {}
    if args.only in (None, "writes"):
        report["writes"] = measure_writes(events, args.log_every)
        print(json.dumps(report["writes"]), flush=True)
    if args.only in (None, "export"):
        report["export"] = measure_export(megabytes)
        print(json.dumps(report["export"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
