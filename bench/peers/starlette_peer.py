#!/usr/bin/env python3
"""The async peer: the same run behind sse-starlette on uvicorn.

A peer for bench/load.py, not a product: what a user would pick instead of
a standard-library threaded server. One asyncio event loop; each run is a
task; each stream owns a bounded asyncio.Queue that the run fills. Each
event is encoded once when it is published, and the same bytes go to every
stream. A stream first gets the run's history after its Last-Event-ID,
then the live events; a stream whose queue is full is ended (its client
reconnects and resumes). sse-starlette's ping sends `: keepalive`.

It serves POST /start, GET /progress/<id>, POST /cancel/<id>,
GET /status/<id> and GET /healthz, with the same job parameters and event
fields as sse_demo's built-in run (and bench/peers/floor.py).

Needs the packages in requirements.txt (uvicorn[standard] brings uvloop and
httptools, which uvicorn uses when they are there):

    python3 -m venv bench/peers/.venv
    bench/peers/.venv/bin/pip install -r bench/peers/requirements.txt
    bench/peers/.venv/bin/python bench/peers/starlette_peer.py --port 5000
"""

import argparse
import asyncio
import collections
import json
import secrets
import time

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HISTORY_LIMIT = 1000
QUEUE_LIMIT = 256                  # events a stream may fall behind before it is ended
KEEPALIVE_S = 1.0
TERMINAL = ("complete", "cancelled", "error")
DEFAULTS = {"iterations": 600, "tick": 0.1, "update_every": 100}
RETRY = b"retry: 2000\n\n"


class Run:
    """One run: its history of encoded events and the queues of its streams."""

    def __init__(self, params):
        self.id = secrets.token_urlsafe(16)
        self.control_key = secrets.token_urlsafe(16)
        self.params = params
        self.cancel = asyncio.Event()
        self.history = collections.deque(maxlen=HISTORY_LIMIT)   # (id, bytes)
        self.followers = set()
        self.last_id = 0
        self.terminal_id = None
        self.state = "running"

    def publish(self, name, data):
        data["ts"] = time.time()
        self.last_id += 1
        encoded = b"id: %d\nevent: %s\ndata: %s\n\n" % (
            self.last_id, name.encode(), json.dumps(data, separators=(",", ":")).encode())
        if name in TERMINAL:
            self.terminal_id, self.state = self.last_id, name
        self.history.append((self.last_id, encoded))
        for queue in list(self.followers):
            try:
                queue.put_nowait(encoded)
            except asyncio.QueueFull:
                self.end_stream(queue)

    def end_stream(self, queue):
        """A stream too far behind: drop what it has not read, and end it."""
        self.followers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)

    async def events(self, last_id):
        """The stream's body: retry, the history after `last_id`, then live
        events up to the terminal one. The history is read and the queue
        joined with no await between, so no event falls in a gap."""
        backlog = [encoded for event_id, encoded in self.history if event_id > last_id]
        queue = None
        if self.terminal_id is None:
            queue = asyncio.Queue(QUEUE_LIMIT)
            self.followers.add(queue)
        try:
            yield RETRY
            for encoded in backlog:
                yield encoded
            while queue is not None:
                encoded = await queue.get()
                if encoded is None:
                    return
                yield encoded
                if self.terminal_id is not None and queue.empty():
                    return
        finally:
            self.followers.discard(queue)


async def run_job(run):
    """sse_demo's built-in run: `iterations` steps, each due `tick` seconds
    after the one before, a progress event every `update_every` steps from
    the first, then `complete`."""
    iterations, tick, every = (run.params[k] for k in ("iterations", "tick", "update_every"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(iterations):
        if i % every == 0:
            run.publish("progress", {
                "iteration": i, "total": iterations, "percent": round(100.0 * i / iterations, 2),
                "improvement_pct": round(20.0 * i / iterations, 2), "dps": 10000.0 + i,
                "elapsed_s": round(loop.time() - started, 2)})
        try:
            await asyncio.wait_for(run.cancel.wait(),
                                   max(0.0, started + (i + 1) * tick - loop.time()))
            run.publish("cancelled", {"iteration": i, "total": iterations})
            return
        except asyncio.TimeoutError:
            pass
    run.publish("complete", {"iteration": iterations, "total": iterations, "percent": 100.0,
                             "elapsed_s": round(loop.time() - started, 2)})


RUNS = {}
TASKS = set()                      # the running jobs (the loop keeps only weak references)


async def start(request):
    body = await request.body()
    params = dict(DEFAULTS)
    try:
        given = json.loads(body or b"{}")
        params.update({k: int(v) if k != "tick" else float(v)
                       for k, v in given.items() if k in DEFAULTS})
    except (ValueError, TypeError, AttributeError):
        return JSONResponse({"error": "bad parameters"}, 400)
    run = Run(params)
    RUNS[run.id] = run
    task = asyncio.get_running_loop().create_task(run_job(run))
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return JSONResponse({"session_id": run.id, "control_key": run.control_key,
                         "stream": "/progress/" + run.id}, 201)


async def progress(request):
    run = RUNS.get(request.path_params["sid"])
    if run is None:
        return JSONResponse({"error": "unknown session"}, 404)
    header = request.headers.get("last-event-id", "")
    last_id = int(header) if header.isdigit() else 0
    if run.terminal_id is not None and last_id >= run.terminal_id:
        return Response(status_code=204)
    return EventSourceResponse(
        run.events(last_id), ping=KEEPALIVE_S, sep="\n", headers={"Cache-Control": "no-cache"},
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive", sep="\n"))


async def cancel(request):
    run = RUNS.get(request.path_params["sid"])
    if run is None:
        return JSONResponse({"error": "unknown session"}, 404)
    if run.terminal_id is not None:
        return JSONResponse({"error": "session has already ended"}, 409)
    run.cancel.set()
    return JSONResponse({"session_id": run.id}, 202)


async def status(request):
    run = RUNS.get(request.path_params["sid"])
    if run is None:
        return JSONResponse({"error": "unknown session"}, 404)
    return JSONResponse({"session_id": run.id, "state": run.state})


async def healthz(request):
    return JSONResponse({"ok": True})


app = Starlette(routes=[
    Route("/start", start, methods=["POST"]),
    Route("/progress/{sid}", progress),
    Route("/cancel/{sid}", cancel, methods=["POST"]),
    Route("/status/{sid}", status),
    Route("/healthz", healthz),
])


def main():
    parser = argparse.ArgumentParser(description="the sse-starlette peer for bench/load.py")
    parser.add_argument("--port", type=int, default=5000)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
