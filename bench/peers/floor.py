#!/usr/bin/env python3
"""The floor: the least work a threaded CPython server does per event.

A peer for bench/load.py, not a product. It marks what this machine and
CPython allow, so sse_demo's figures can be read against it: whatever
sse_demo spends above the floor buys its features (history bounds, slow
clients kept without blocking anyone, the journal, Pushpin, TLS...).

What it does, and nothing more:
- raw sockets, no http.server: a thread reads each connection's requests;
  a stream's socket then joins its run and that thread ends;
- the run's own thread encodes each event once, as a finished chunked
  frame, and writes it straight to every subscriber with one non-blocking
  send: no queue, no writer thread, no wake-up;
- a subscriber that cannot take a whole frame at once is dropped (sse_demo
  keeps it and catches it up instead);
- one thread sends `: keepalive` to quiet streams.

It serves POST /start, GET /progress/<id> (with Last-Event-ID),
POST /cancel/<id>, GET /status/<id> and GET /healthz, with the same job
parameters and event fields as sse_demo's built-in run.

    python3 bench/peers/floor.py --port 5000
"""

import argparse
import collections
import json
import secrets
import socket
import threading
import time

HISTORY_LIMIT = 1000
KEEPALIVE_S = 1.0
MAX_HEAD_BYTES = 16 * 1024
TERMINAL = ("complete", "cancelled", "error")
DEFAULTS = {"iterations": 600, "tick": 0.1, "update_every": 100}
REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
           400: "Bad Request", 404: "Not Found", 409: "Conflict"}


def chunk(payload):
    return b"%x\r\n%s\r\n" % (len(payload), payload)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n") + chunk(b"retry: 2000\n\n")
KEEPALIVE = chunk(b": keepalive\n\n")
LAST_CHUNK = b"0\r\n\r\n"


class Run:
    """One run: its history of finished frames and the sockets that follow it."""

    def __init__(self, params):
        self.id = secrets.token_urlsafe(16)
        self.control_key = secrets.token_urlsafe(16)
        self.params = params
        self.cancel = threading.Event()
        self.lock = threading.Lock()        # guards everything below
        self.history = collections.deque(maxlen=HISTORY_LIMIT)   # (id, frame)
        self.followers = {}                 # socket -> monotonic time of its last write
        self.last_id = 0
        self.terminal_id = None
        self.state = "running"

    def publish(self, name, data):
        data["ts"] = time.time()
        with self.lock:
            self.last_id += 1
            sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.last_id, name.encode(), json.dumps(data, separators=(",", ":")).encode())
            frame = chunk(sse)
            if name in TERMINAL:
                frame += LAST_CHUNK
                self.terminal_id, self.state = self.last_id, name
            self.history.append((self.last_id, frame))
            now = time.monotonic()
            for sock in list(self.followers):
                if send_whole(sock, frame):
                    self.followers[sock] = now
                else:
                    self.drop(sock)
            if self.terminal_id is not None:
                for sock in list(self.followers):
                    self.drop(sock)

    def follow(self, sock, last_id):
        """Send the head and the history after `last_id`, then follow (or
        close, when the run has ended)."""
        sock.settimeout(5.0)                # a joiner too slow for its history is dropped
        with self.lock:
            if self.terminal_id is not None and last_id >= self.terminal_id:
                sock.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                sock.close()
                return
            sock.sendall(STREAM_HEAD + b"".join(f for i, f in self.history if i > last_id))
            if self.terminal_id is not None:
                sock.close()
                return
            sock.setblocking(False)
            self.followers[sock] = time.monotonic()

    def drop(self, sock):
        self.followers.pop(sock, None)
        try:
            sock.close()
        except OSError:
            pass

    def keep_alive(self, now):
        with self.lock:
            for sock, last in list(self.followers.items()):
                if now - last >= KEEPALIVE_S:
                    if send_whole(sock, KEEPALIVE):
                        self.followers[sock] = now
                    else:
                        self.drop(sock)


def send_whole(sock, frame):
    """One non-blocking send: True when the socket took the whole frame."""
    try:
        return sock.send(frame) == len(frame)
    except OSError:
        return False


def run_job(run):
    """sse_demo's built-in run: `iterations` steps, each due `tick` seconds
    after the one before, a progress event every `update_every` steps from
    the first, then `complete`."""
    iterations, tick, every = (run.params[k] for k in ("iterations", "tick", "update_every"))
    started = time.monotonic()
    for i in range(iterations):
        if i % every == 0:
            run.publish("progress", {
                "iteration": i, "total": iterations, "percent": round(100.0 * i / iterations, 2),
                "improvement_pct": round(20.0 * i / iterations, 2), "dps": 10000.0 + i,
                "elapsed_s": round(time.monotonic() - started, 2)})
        if run.cancel.wait(max(0.0, started + (i + 1) * tick - time.monotonic())):
            run.publish("cancelled", {"iteration": i, "total": iterations})
            return
    run.publish("complete", {"iteration": iterations, "total": iterations, "percent": 100.0,
                             "elapsed_s": round(time.monotonic() - started, 2)})


class Floor:
    def __init__(self, port):
        self.runs = {}
        self.lock = threading.Lock()        # guards runs
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)

    def serve(self):
        threading.Thread(target=self.keepalives, daemon=True).start()
        while True:
            sock, _ = self.listener.accept()
            threading.Thread(target=self.connection, args=(sock,), daemon=True).start()

    def keepalives(self):
        while True:
            time.sleep(KEEPALIVE_S / 4)
            now = time.monotonic()
            with self.lock:
                runs = list(self.runs.values())
            for run in runs:
                run.keep_alive(now)

    def connection(self, sock):
        """Requests on one keep-alive connection, until a stream takes it."""
        reader = sock.makefile("rb")
        try:
            while True:
                request = read_request(reader)
                if request is None:
                    break
                if self.answer(sock, *request):
                    return                  # the socket follows a run now
        except (OSError, ValueError):
            pass
        reader.close()
        sock.close()

    def answer(self, sock, method, path, headers, body):
        """Answer one request; True when the socket became a stream."""
        parts = path.split("?")[0].strip("/").split("/")
        run = self.runs.get(parts[1]) if len(parts) == 2 else None
        if method == "GET" and parts == ["healthz"]:
            send_json(sock, 200, {"ok": True})
        elif method == "POST" and parts == ["start"]:
            params = dict(DEFAULTS)
            params.update({k: v for k, v in json.loads(body or b"{}").items() if k in DEFAULTS})
            run = Run(params)
            with self.lock:
                self.runs[run.id] = run
            threading.Thread(target=run_job, args=(run,), daemon=True).start()
            send_json(sock, 201, {"session_id": run.id, "control_key": run.control_key,
                                  "stream": "/progress/" + run.id})
        elif run is None:
            send_json(sock, 404, {"error": "not found"})
        elif method == "GET" and parts[0] == "progress":
            last = headers.get("last-event-id", "")
            run.follow(sock, int(last) if last.isdigit() else 0)
            return True
        elif method == "GET" and parts[0] == "status":
            send_json(sock, 200, {"session_id": run.id, "state": run.state})
        elif method == "POST" and parts[0] == "cancel":
            if run.terminal_id is not None:
                send_json(sock, 409, {"error": "ended"})
            else:
                run.cancel.set()
                send_json(sock, 202, {"session_id": run.id})
        else:
            send_json(sock, 404, {"error": "not found"})
        return False


def read_request(reader):
    """(method, path, headers, body), or None at the end of the connection."""
    line = reader.readline(MAX_HEAD_BYTES)
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while True:
        line = reader.readline(MAX_HEAD_BYTES).decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0)))
    return method, path, headers, body


def send_json(sock, status, data):
    body = json.dumps(data).encode()
    sock.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (status, REASONS[status].encode(),
                                                    len(body), body))


def main():
    parser = argparse.ArgumentParser(description="the floor peer for bench/load.py")
    parser.add_argument("--port", type=int, default=5000)
    Floor(parser.parse_args().port).serve()


if __name__ == "__main__":
    main()
