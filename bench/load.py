#!/usr/bin/env python3
"""Load benchmark for sse_demo: how fast and how lean it serves streams.

Standard library only, Linux (it reads /proc), traffic on loopback only.
Every scenario launches a fresh server, puts one kind of load on it, and
reports figures; a column per variant of the server (plain HTTP, TLS, a
token), all measured in the same run, so the machine's noise falls on each.

    python3 bench/load.py                               # every scenario, plain
    python3 bench/load.py --quick                       # small sizes, about a minute
    python3 bench/load.py --scenarios fanout --variants plain,tls
    python3 bench/load.py --scenarios latency --variants plain,token
    python3 bench/load.py --peers floor,starlette       # beside the peers in bench/peers
    python3 bench/load.py --server 'python3 other.py --port {port}'

Scenarios (full size / --quick):
  startup   seconds from exec to the first 200 on /healthz (5 / 3 launches),
            and the idle server's memory and threads
  latency   one run publishing every 5 ms (2,000 / 400 events), one stream:
            publish-to-receive p50, p99, max
  fanout    one run publishing 20 events/s to 1,000 / 200 streams for 10 / 3 s:
            latency over every (stream, event), every stream got every event,
            and the server's CPU during the window
  sessions  500 / 100 runs at 10 events/s each, a stream each, 20 / 4 s
  hold      idle streams held (5,000 / 1,000), each with its first event and a
            keepalive; memory per stream
  churn     5,000 / 500 short connections, half abandoned after the head:
            threads, descriptors and streams back where they were
  queue     1,000 / 200 short runs started at once through --concurrency 4:
            runs per second, and the time from a run's end (its slot freed)
            to the next run's first event (--set queue.tick=0.01: runs of
            20 ms, so the queue fills before it drains)

Latency is the receive time minus the event's `ts` (the server's
time.time() when it published it), both on this machine. Over plain HTTP the
receive time is the kernel's (SO_TIMESTAMPNS, Linux), so the client's own
delay in getting to a socket is not counted; over TLS, where the bytes the
kernel received are not yet the event, it is the client's time.time() after
decryption, which includes that delay (`client CPU %` near 100 means the
client, not the server, is the limit). The server is pinned to one CPU and
the client to another where the machine has two (taskset).

Variants: `plain`; `tls` (a self-signed certificate made with openssl,
--certfile/--keyfile); `token` (SSE_DEMO_TOKEN for the server, every request
with `Authorization: Bearer`); `state` (--state-dir in a fresh temporary
folder: every run journaled). `--json FILE` keeps the report.

Peers (`--peers`), each a column beside sse_demo's, over plain HTTP:
`floor` (bench/peers/floor.py: the least work a threaded CPython server does
per event; standard library only) and `starlette` (bench/peers/
starlette_peer.py: the same run behind sse-starlette on uvicorn, which needs
its packages: see bench/peers/requirements.txt). They serve the contract's
core, not the queue: the queue scenario is skipped for them.
"""

import argparse
import collections
import http.client
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SERVER = "%s %s --port {port}" % (shlex.quote(sys.executable),
                                          shlex.quote(os.path.join(HERE, "..", "sse_demo.py")))
TOKEN = "bench-token-0123456789abcdef"
PEERS_DIR = os.path.join(HERE, "peers")
PEER_PYTHON = {"floor": sys.executable,
               "starlette": os.path.join(PEERS_DIR, ".venv", "bin", "python")}
PEER_INSTALL = ("python3 -m venv bench/peers/.venv && "
                "bench/peers/.venv/bin/pip install -r bench/peers/requirements.txt")
# Kernel receive timestamps: Python does not name SO_TIMESTAMPNS; 35 is its
# value on x86 and ARM Linux. The control message is a timespec (two longs).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@ll")
KERNEL_TIMES = sys.platform.startswith("linux")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

SIZES = {   # full, quick
    "startup": ({"launches": 5}, {"launches": 3}),
    "latency": ({"iterations": 2000}, {"iterations": 400}),
    "fanout": ({"streams": 1000, "window": 10.0}, {"streams": 200, "window": 3.0}),
    "sessions": ({"sessions": 500, "seconds": 20.0}, {"sessions": 100, "seconds": 4.0}),
    "hold": ({"streams": 5000}, {"streams": 1000}),
    "churn": ({"connections": 5000}, {"connections": 500}),
    "queue": ({"runs": 1000, "concurrency": 4, "tick": 0.0},
              {"runs": 200, "concurrency": 4, "tick": 0.0}),
}


class BenchError(Exception):
    """A scenario the server could not do: reported as FAIL with the reason."""


###############################################################################
# The server under test: launched, watched through /proc, stopped
###############################################################################

class Server:
    def __init__(self, template, variant, tls_files, cpu, extra=()):
        self.port = free_port()
        self.variant = variant
        command = shlex.split(template.format(port=self.port, host="127.0.0.1")) + list(extra)
        env = dict(os.environ)
        env.pop("SSE_DEMO_TOKEN", None)
        if variant == "tls":
            command += ["--certfile", tls_files[0], "--keyfile", tls_files[1]]
        if variant == "token":
            env["SSE_DEMO_TOKEN"] = TOKEN
        self.state_dir = None
        if variant == "state":
            self.state_dir = tempfile.mkdtemp(prefix="bench-state-")
            command += ["--state-dir", self.state_dir]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu)] + command
        self.log = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=self.log, env=env,
                                     start_new_session=True)
        self.client = Client(self.port, variant)
        try:
            self.launch_s = self.wait_ready()
        except BaseException:       # no one else holds it yet to stop it
            self.stop()
            raise

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError("the server exited with status %d" % self.proc.returncode)
            try:
                if self.client.request("GET", "/healthz")[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.005)
        raise BenchError("the server did not answer /healthz within %d s" % timeout)

    def stats(self):
        """(CPU seconds, RSS KB, threads, open descriptors) from /proc."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss = int(fields[21]) * PAGE_KB
        threads = int(fields[17])
        fds = len(os.listdir("/proc/%d/fd" % self.proc.pid))
        return cpu, rss, threads, fds

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


###############################################################################
# The client: requests, and many streams read by one selector loop
###############################################################################

class Client:
    def __init__(self, port, variant):
        self.port = port
        self.tls = ssl._create_unverified_context() if variant == "tls" else None
        self.headers = {"Authorization": "Bearer " + TOKEN} if variant == "token" else {}

    def request(self, method, path, body=None, timeout=10.0):
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=self.tls)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = dict(self.headers, **({"Content-Type": "application/json"} if body else {}))
            conn.request(method, path, body=json.dumps(body).encode() if body else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def start(self, **params):
        status, body = self.request("POST", "/start", params)
        if status != 201:
            raise BenchError("POST /start answered %d: %s" % (status, body[:200]))
        answer = json.loads(body)
        return answer["session_id"], answer["control_key"]

    def cancel(self, sid, key):
        conn_headers = dict(self.headers)
        conn_headers["Authorization"] = "Bearer " + key
        saved, self.headers = self.headers, conn_headers
        try:
            return self.request("POST", "/cancel/" + sid)[0]
        finally:
            self.headers = saved

    def open_stream(self, sid, loop):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10.0)
        if self.tls:
            sock = self.tls.wrap_socket(sock, server_hostname="127.0.0.1")
        lines = ["GET /progress/%s HTTP/1.1" % sid, "Host: 127.0.0.1:%d" % self.port]
        lines += ["%s: %s" % item for item in self.headers.items()]
        if KERNEL_TIMES and not self.tls:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        stream = Stream(sock, time.time())
        loop.register(stream)
        return stream


class Stream:
    """One SSE stream over HTTP/1.1 chunked, parsed as it arrives."""

    def __init__(self, sock, opened):
        self.sock = sock
        self.opened = opened
        self.status = None
        self.buffer = b""
        self.body = b""
        self.events = []            # (id, name, ts, received)
        self.keepalives = 0
        self.ended = False
        self.error = None

    def feed(self, data, received):
        self.buffer += data
        if self.status is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(None, 2)[1])
            self.buffer = rest
        while True:     # chunked framing
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            size = int(line.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            self.body += rest[:size]
            self.buffer = rest[size + 2:]
            if size == 0:
                self.ended = True
                break
        while b"\n\n" in self.body:
            block, _, self.body = self.body.partition(b"\n\n")
            self.on_block(block.decode("utf-8"), received)

    def on_block(self, block, received):
        fields = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                self.keepalives += 1
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            ts = json.loads(fields["data"]).get("ts")
            self.events.append((int(fields.get("id", 0)), fields.get("event", "message"),
                                ts, received))

    @property
    def terminal(self):
        return bool(self.events) and self.events[-1][1] in ("complete", "cancelled", "error")


class Loop:
    """One selector for every stream: reads whatever arrived."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.streams = []

    def register(self, stream):
        self.selector.register(stream.sock, selectors.EVENT_READ, stream)
        self.streams.append(stream)

    def run(self, until, timeout):
        """Read until `until()` is true or `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _ in self.selector.select(min(left, 0.1)):
                self.read(key.data)
        return True

    def poll(self):
        for key, _ in self.selector.select(0):
            self.read(key.data)

    def read(self, stream):
        for _ in range(64):     # TLS may hold several records after one readable
            try:
                data, received = self.receive(stream.sock)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except OSError as exc:
                self.drop(stream, exc)
                return
            if not data:
                self.drop(stream, "end of file")
                return
            stream.feed(data, received)
            if stream.ended:
                self.drop(stream, None)
                return

    @staticmethod
    def receive(sock):
        """(bytes, when they arrived): the kernel's time where it gives one."""
        if isinstance(sock, ssl.SSLSocket) or not KERNEL_TIMES:
            return sock.recv(65536), time.time()
        data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and \
                    len(payload) >= TIMESPEC.size:
                seconds, nanoseconds = TIMESPEC.unpack(payload[:TIMESPEC.size])
                return data, seconds + nanoseconds / 1e9
        return data, time.time()

    def drop(self, stream, error):
        stream.error = error
        try:
            self.selector.unregister(stream.sock)
        except (KeyError, ValueError):
            pass
        stream.sock.close()

    def close(self):
        for stream in self.streams:
            if stream.sock.fileno() != -1:
                self.drop(stream, None)
        self.selector.close()


def open_streams(client, sids, loop):
    """A stream on each session id; raises BenchError if one fails."""
    streams = []
    for sid in sids:
        try:
            streams.append(client.open_stream(sid, loop))
        except OSError as exc:
            raise BenchError("stream %d of %d could not connect: %s" % (len(streams) + 1,
                                                                        len(sids), exc))
        if len(streams) % 100 == 0:
            loop.poll()     # read what the first ones got meanwhile
    return streams


###############################################################################
# Figures
###############################################################################

def percentile(values, pct):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(pct / 100.0 * (len(values) - 1))))]


def latency_figures(latencies_ms):
    return {"p50 ms": percentile(latencies_ms, 50), "p99 ms": percentile(latencies_ms, 99),
            "max ms": max(latencies_ms) if latencies_ms else None}


class ClientCPU:
    def __enter__(self):
        self.started = time.monotonic(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.monotonic() - self.started[0], time.process_time() - self.started[1]
        self.percent = 100.0 * cpu / wall if wall else 0.0


###############################################################################
# Scenarios
###############################################################################

def scenario_startup(template, variant, tls_files, cpu, size):
    launches, figures = [], {}
    for number in range(size["launches"]):
        server = Server(template, variant, tls_files, cpu)
        try:
            launches.append(server.launch_s)
            if number == 0:
                time.sleep(0.5)
                _, rss, threads, _ = server.stats()
                figures.update({"idle RSS MB": rss / 1024.0, "idle threads": threads})
        finally:
            server.stop()
    figures.update({"startup s": percentile(launches, 50), "min s": min(launches),
                    "max s": max(launches)})
    return figures


def scenario_latency(server, size):
    sid, _ = server.client.start(iterations=size["iterations"], tick=0.005, update_every=1)
    loop = Loop()
    try:
        stream, = open_streams(server.client, [sid], loop)
        if not loop.run(lambda: stream.terminal, 30 + size["iterations"] * 0.01):
            raise BenchError("no terminal event")
    finally:
        loop.close()
    live = [(received - ts) * 1000 for _, _, ts, received in stream.events
            if ts is not None and received > stream.opened and ts > stream.opened]
    figures = {"events delivered": len({e[0] for e in stream.events}),
               "expected": stream.events[-1][0]}
    figures.update(latency_figures(live))
    return figures


def scenario_fanout(server, size):
    sid, key = server.client.start(iterations=10 ** 6, tick=0.05, update_every=1)
    loop = Loop()
    try:
        started = time.monotonic()
        streams = open_streams(server.client, [sid] * size["streams"], loop)
        if not loop.run(lambda: all(s.status is not None for s in streams), 30):
            raise BenchError("not every stream got its response head")
        if any(s.status != 200 for s in streams):
            raise BenchError("a stream was answered %d" % next(s.status for s in streams
                                                                if s.status != 200))
        connect_s = time.monotonic() - started
        joined_at = time.time()
        cpu_before = server.stats()[0]
        with ClientCPU() as client:
            loop.run(lambda: False, size["window"])
        cpu_window = server.stats()[0] - cpu_before
        if server.client.cancel(sid, key) != 202:
            raise BenchError("cancel was not accepted")
        if not loop.run(lambda: all(s.terminal or s.error for s in streams), 30):
            raise BenchError("not every stream got the terminal event")
    finally:
        loop.close()
    due = sorted({e[0] for s in streams for e in s.events if e[2] is not None and e[2] > joined_at})
    latencies, complete = [], 0
    for s in streams:
        got = {e[0] for e in s.events}
        complete += all(i in got for i in due)
        latencies += [(r - ts) * 1000 for i, _, ts, r in s.events if ts is not None and ts > joined_at]
    figures = {"streams joined": len(streams), "connect s": connect_s, "window events": len(due),
               "streams with every event": complete,
               "server CPU % (window)": 100.0 * cpu_window / size["window"],
               "client CPU %": client.percent}
    figures.update(latency_figures(latencies))
    if complete < len(streams):
        raise BenchError("%d of %d streams missed events" % (len(streams) - complete, len(streams)),
                         figures)
    return figures


def scenario_sessions(server, size):
    iterations = int(size["seconds"] / 0.1)
    cpu_before = server.stats()[0]
    started = time.monotonic()
    sids = [server.client.start(iterations=iterations, tick=0.1, update_every=1)[0]
            for _ in range(size["sessions"])]
    loop = Loop()
    try:
        streams = open_streams(server.client, sids, loop)
        setup_s = time.monotonic() - started
        with ClientCPU() as client:
            ok = loop.run(lambda: all(s.terminal or s.error for s in streams),
                          size["seconds"] + 60)
        if not ok:
            raise BenchError("not every stream got its terminal event")
    finally:
        loop.close()
    elapsed = time.monotonic() - started
    cpu = server.stats()[0] - cpu_before
    events = sum(len(s.events) for s in streams)
    latencies = [(r - ts) * 1000 for s in streams for _, _, ts, r in s.events
                 if ts is not None and ts > s.opened]
    figures = {"setup s": setup_s, "streams ended": sum(s.terminal for s in streams),
               "events/s": events / elapsed, "server CPU s": cpu,
               "server CPU %": 100.0 * cpu / elapsed, "client CPU %": client.percent}
    figures.update(latency_figures(latencies))
    return figures


def scenario_hold(server, size, keepalive_s=1.0):
    _, rss_before, _, _ = server.stats()
    sids = [server.client.start(iterations=1000, tick=60, update_every=1000)[0]
            for _ in range(max(1, size["streams"] // 100))]
    loop = Loop()
    try:
        started = time.monotonic()
        streams = open_streams(server.client, [sids[i % len(sids)] for i in range(size["streams"])],
                               loop)
        if not loop.run(lambda: all(s.events for s in streams), 60):
            raise BenchError("%d streams without their first event"
                             % sum(not s.events for s in streams))
        ramp_s = time.monotonic() - started
        marks = [s.keepalives for s in streams]
        loop.run(lambda: all(s.keepalives > m for s, m in zip(streams, marks)), 2.5 * keepalive_s)
        quiet = sum(s.keepalives <= m for s, m in zip(streams, marks))
        _, rss, threads, _ = server.stats()
    finally:
        loop.close()
    figures = {"streams held": len(streams) - quiet, "ramp s": ramp_s,
               "RSS KB/stream": (rss - rss_before) / float(len(streams)),
               "threads at held": threads}
    if quiet:
        raise BenchError("%d streams got no keepalive within %.1f s" % (quiet, 2.5 * keepalive_s),
                         figures)
    return figures


def scenario_churn(server, size, keepalive_s=1.0):
    sids = [server.client.start(iterations=1000, tick=60, update_every=1000)[0] for _ in range(5)]
    time.sleep(0.5)
    _, _, threads_before, fds_before = server.stats()
    started, errors = time.monotonic(), 0
    for number in range(size["connections"]):
        loop = Loop()
        try:
            stream = server.client.open_stream(sids[number % len(sids)], loop)
            if number % 2:
                loop.run(lambda: stream.status is not None, 10)
                errors += stream.status != 200
        except OSError:
            errors += 1
        finally:
            loop.close()
    churn_s = time.monotonic() - started
    deadline = time.monotonic() + 5 * keepalive_s + 10
    time.sleep(3 * keepalive_s)
    while time.monotonic() < deadline:
        _, _, threads, fds = server.stats()
        if threads <= threads_before + 2 and fds <= fds_before + 5:
            break
        time.sleep(0.25)
    figures = {"connect errors": errors, "churn s": churn_s, "threads before": threads_before,
               "threads after": threads, "fds before": fds_before, "fds after": fds,
               "settle s": time.monotonic() - started - churn_s}
    if threads > threads_before + 2 or fds > fds_before + 5:
        raise BenchError("threads or descriptors did not come back", figures)
    return figures


def scenario_queue(server, size):
    """Short runs (two steps, `tick` apart); with tick 0 the queue is the
    work, with a tick the queue fills up first and every run hears each
    change of its position."""
    cpu_before = server.stats()[0]
    started = time.monotonic()
    sids = [server.client.start(iterations=2, tick=size["tick"], update_every=1)[0]
            for _ in range(size["runs"])]
    accepted_s = time.monotonic() - started
    deadline = time.monotonic() + 120
    while json.loads(server.client.request("GET", "/status/" + sids[-1])[1])["state"] in \
            ("queued", "running"):
        if time.monotonic() > deadline:
            raise BenchError("the last run did not end within 120 s")
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    cpu = server.stats()[0] - cpu_before
    firsts, ends = [], []
    for sid in sids:
        events = [json.loads(line) for line in
                  server.client.request("GET", "/export/" + sid)[1].splitlines()]
        firsts.append(next(e["data"]["ts"] for e in events if e["event"] == "progress"))
        ends.append(events[-1]["data"]["ts"])
    ended = sorted(ends)
    gaps = []
    for first in sorted(firsts)[size["concurrency"]:]:
        freed = [end for end in ended if end <= first]
        if freed:
            gaps.append((first - freed[-1]) * 1000)
    figures = {"runs": len(sids), "accepted s": accepted_s, "runs/s": len(sids) / elapsed,
               "server CPU s": cpu}
    figures.update({"slot to next run " + name: value
                    for name, value in latency_figures(gaps).items()})
    return figures


SCENARIO_ARGS = {"queue": lambda size: ["--concurrency", str(size["concurrency"]),
                                        "--max-queue", str(size["runs"])]}
PEERLESS = {"queue"}        # scenarios of options (--concurrency) the peers do not have
SCENARIOS = {"startup": None, "queue": scenario_queue, "latency": scenario_latency, "fanout": scenario_fanout,
             "sessions": scenario_sessions, "hold": scenario_hold, "churn": scenario_churn}


def run_scenario(name, template, variant, tls_files, cpu, size):
    """{figure: value}, with `result` ok or FAIL: <reason>."""
    started = time.monotonic()
    figures = {}
    try:
        if name == "startup":
            figures = scenario_startup(template, variant, tls_files, cpu, size)
        else:
            extra = SCENARIO_ARGS.get(name, lambda size: [])(size)
            server = Server(template, variant, tls_files, cpu, extra)
            try:
                figures = {"launch s": server.launch_s}
                figures.update(SCENARIOS[name](server, size))
            finally:
                server.stop()
        figures["result"] = "ok"
    except BenchError as exc:
        if len(exc.args) > 1:
            figures.update(exc.args[1])
        figures["result"] = "FAIL: %s" % exc.args[0]
    figures["wall s"] = time.monotonic() - started
    return figures


###############################################################################
# The command line
###############################################################################

def make_tls_files(folder):
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def pick_cpus():
    """(server CPU, client CPU): two different ones where there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil_which("taskset"):
        return None, None
    os.sched_setaffinity(0, {cpus[1]})
    return cpus[0], cpus[1]


def shutil_which(name):
    return any(os.access(os.path.join(d, name), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep))


def raise_open_file_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def format_value(value):
    if isinstance(value, float):
        return "%.3g" % value if abs(value) < 10 else "{:,.0f}".format(value)
    if isinstance(value, int):
        return "{:,}".format(value)
    return "-" if value is None else str(value)


def print_report(report, out=sys.stdout):
    """One markdown table per scenario, a column per variant."""
    for name, by_variant in report["scenarios"].items():
        variants = list(by_variant)
        rows = collections.OrderedDict()
        for variant in variants:
            for figure in by_variant[variant]:
                rows.setdefault(figure, None)
        out.write("\n### %s\n\n| figure | %s |\n|---|%s\n" % (
            name, " | ".join(variants), "---|" * len(variants)))
        for figure in rows:
            out.write("| %s | %s |\n" % (figure, " | ".join(
                format_value(by_variant[v].get(figure)) for v in variants)))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help="the server command; {port} is filled in (default: this sse_demo.py)")
    p.add_argument("--scenarios", default=",".join(SIZES),
                   help="comma-separated, in order (default: all)")
    p.add_argument("--variants", default="plain",
                   help="comma-separated: plain, tls, token, state (default: plain)")
    p.add_argument("--peers", default="",
                   help="comma-separated peers measured beside it: floor, starlette")
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    p.add_argument("--set", action="append", default=[], metavar="SCENARIO.NAME=VALUE",
                   help="change one size, e.g. fanout.streams=2000; repeatable")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    args.variants = args.variants.split(",")
    for name in args.scenarios:
        if name not in SIZES:
            p.error("unknown scenario %r (known: %s)" % (name, ", ".join(SIZES)))
    for variant in args.variants:
        if variant not in ("plain", "tls", "token", "state"):
            p.error("unknown variant %r" % variant)
    args.columns = [(variant, args.server, variant, False) for variant in args.variants]
    for peer in filter(None, args.peers.split(",")):
        if peer not in PEER_PYTHON:
            p.error("unknown peer %r (known: %s)" % (peer, ", ".join(PEER_PYTHON)))
        if not os.access(PEER_PYTHON[peer], os.X_OK):
            p.error("the %s peer needs its packages; install them with:\n  %s"
                    % (peer, PEER_INSTALL))
        script = os.path.join(PEERS_DIR, "floor.py" if peer == "floor" else "starlette_peer.py")
        args.columns.append((peer, "%s %s --port {port}" % (
            shlex.quote(PEER_PYTHON[peer]), shlex.quote(script)), "plain", True))
    return args


def main(argv=None):
    args = parse_args(argv)
    raise_open_file_limit()
    sizes = {name: dict(SIZES[name][1 if args.quick else 0]) for name in SIZES}
    for setting in args.set:
        target, _, value = setting.partition("=")
        scenario, _, name = target.partition(".")
        sizes[scenario][name] = type(sizes[scenario][name])(value)
    server_cpu, client_cpu = pick_cpus()
    report = {"server": args.server, "sizes": sizes, "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "scenarios": collections.OrderedDict()}
    with tempfile.TemporaryDirectory() as folder:
        tls_files = make_tls_files(folder) if "tls" in args.variants else None
        for name in args.scenarios:
            report["scenarios"][name] = collections.OrderedDict()
            for label, template, variant, peer in args.columns:
                if peer and name in PEERLESS:
                    figures = {"result": "skipped: not served by this peer"}
                else:
                    figures = run_scenario(name, template, variant, tls_files, server_cpu,
                                           sizes[name])
                report["scenarios"][name][label] = figures
                print("%s / %s: %s" % (name, label, figures["result"]), file=sys.stderr)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = any(f["result"].startswith("FAIL")
                 for v in report["scenarios"].values() for f in v.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
