#!/usr/bin/env python3
"""sse_demo: stream the progress of long-running jobs to a browser with
Server-Sent Events.

One file, no dependencies other than the Python Standard Library, tested on
CPython 3.7 to 3.13. Run it, open the page, press Start:

    python sse_demo.py                 # http://127.0.0.1:5000/
    python sse_demo.py --help          # every option

The wire protocol (endpoints, event format, resume, limits) is PROTOCOL.md
beside this file; the README says how to use it, and tells "plug in your
own job" in full (the short version is below).

One name in the code for one thing: a *session* is what the README, the
page and PROTOCOL.md call a *run* (one start of the job, its events and its
state). The wire kept `session_id` and `/progress/<session id>` from the
first version, and the code names things after the wire.

The public API is ``__all__``: what a program that imports this file may
rely on. Every other function and class starts with ``_``: read it, copy
it, but it may change. The constants (``UPPER_CASE``) are the tunables, and
are named without one.

Plug in your own job
--------------------
A job is any callable whose first parameter receives ``progress``::

    @describe_job(title="Optimise the build",                  # optional
                  params={"generations": {"min": 1, "max": 500}},
                  fields={"best_score": {"label": "Best score", "unit": "pts"}})
    def optimize_build(progress, generations=50, cancel=None):
        for g in range(generations):
            progress(g, generations, best_score=score(g))  # -> a `progress` event
            progress.log("generation %d done" % g)         # -> a `log` event
        return {"best": "..."}                             # -> `complete`, as "result"

    python sse_demo.py --job mypackage.builds:optimize_build
    python sse_demo.py --cmd 'python train.py --epochs {epochs=10}'   # any program
    python sse_demo.py watch 'http://host:5000/#session=...'        # a run, in a terminal
    python sse_demo.py report http://host:5000/ -- python train.py    # a run elsewhere
    # or from Python: sse_demo.serve(job=optimize_build, port=5000)

- ``progress(done, total=None, stage=None, **fields)`` publishes an event
  holding ``iteration``, ``total``, ``percent``, ``elapsed_s``, ``ts`` and
  your JSON-serialisable fields; ``progress.log(text, level)`` a line of
  text; ``progress.bar(label, total)`` a bar nested inside the current
  position (batches in an epoch), itself called as ``bar(done, **fields)``.
  None of them ever blocks, whatever the clients do.
- After ``POST /cancel`` the next ``progress(...)`` raises ``Cancelled``, which
  unwinds the job; the run ends with a ``cancelled`` event. A job that wants
  to stop sooner accepts a ``cancel`` keyword (a flag with ``is_set``, ``wait`` and
  ``set``, as on a ``threading.Event``).
- ``POST /start`` accepts exactly the keyword parameters that have defaults;
  their types come from the defaults, their bounds from ``describe_job``.
- An exception becomes an ``error`` event with its message; the traceback goes
  to the log and the server goes on.

Threads, and what each owns
---------------------------
- main: starts everything, waits for Ctrl-C or SIGTERM, stops everything.
- ``ThreadingHTTPServer``'s short-lived request threads: parse a request,
  answer the JSON endpoints, write a stream's response head, then hand the
  socket to the writer. None waits on an open stream or an idle connection.
- ``stream-writer`` (``_StreamWriter``; ``_StreamHub`` is what other threads
  call, ``_StreamSockets`` the sockets): owns every stream's socket and every
  idle keep-alive connection (parked). It waits on all of them at once
  (``selectors``), writes each event (encoded once) to every subscriber
  without blocking, sends keepalives, closes stuck readers, and resumes a
  parked connection in the HTTP server when its next request arrives. So an
  idle stream costs no thread, and an event no thread wake-up per viewer.
  One exception, the common case: the thread that publishes an event
  writes it itself to each stream of its run that can take it now (caught
  up, its socket with room; a run with at most 8 streams), as nginx and
  Go's net/http write from the thread that has the bytes, and hands the
  writer only what would block, the rest of a run's streams, an event
  that comes less than a millisecond after its run's last and the end of
  a body. When events still come to it faster than one a millisecond, it
  lets them gather that long between turns, so that one wake-up writes
  several (one send for many events, where the publisher would pay one
  each). The publisher reads the writer's map of streams without a lock
  of its own: CPython makes that look-up and its copy atomic (the
  interpreter lock, or in a free-threaded build the dict's own), and at
  worst it is a turn old. A page's stream also carries the runs list and
  is paced (its progress coalesced to one write every 20 ms): see
  _Connection.
- one worker per running run (``job-...``): runs the job and publishes its
  events into the run's ``_Session`` (history, ids, state, and its whole
  record: series and events, for /series, /log, /export); with ``--cmd``,
  two more read the program's stdout and stderr, and a guard process
  (not a thread) kills the programs if the server dies without stopping.
  With ``--concurrency N`` the ``_RunQueue`` starts at most N of them; the
  thread of a run that ends starts the next in line.
- ``journal`` (``--state-dir``) writes events to disk; ``grip-publisher``
  (``--grip``) sends them to Pushpin, at most every 0.1 s; ``notifier``
  (``--notify``) POSTs each run's end; ``runs-feed`` gathers the runs list's
  changes for GET /runs/events; ``reporter-watch`` ends a run reported from
  elsewhere (POST /runs) whose reporter has gone silent. None is waited for, but for the journal's
  id mark once per 1,000 events, asked for ahead of need.
- These long-lived threads run under a ``_Supervisor``: a thread that stops
  is logged once and named by /healthz.

It binds to loopback. Off loopback it asks for a token (and serves HTTPS
with ``--certfile``): see "Reach it from another machine" in the README.
Served from the command line (``serve()``), it also sets the garbage
collector to run less often (``_tune_garbage_collector``).
"""

__version__ = "1.0.0"
__all__ = ["serve", "make_server", "Options", "main", "describe_job", "Cancelled", "BadParam",
           "function_job", "command_job", "SSEServer", "JobSpec", "Progress", "Bar",
           "simulate_optimisation", "Reporter"]

import argparse
import base64
import codecs
import collections
import dataclasses
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import http.client
import http.server
import importlib
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse

try:
    import ssl
except ImportError:       # a Python built without OpenSSL: all but --certfile works
    ssl = None

log = logging.getLogger("sse_demo")


###############################################################################
# Configuration
###############################################################################

# The tunables that are not options (the options, with their defaults, are
# `Options`, by the server). A section's own constants (the journal's, a --cmd
# program's output limits...) open that section, next to the code they tune.

STUCK_KEEPALIVES = 4               # a stream whose socket accepts nothing this many
                                   # keepalive intervals is closed
WRITE_TIMEOUT_S = 10.0             # a blocking response write (handler threads) gives up
WORKER_STOP_GRACE_S = 0.5          # on shutdown, how long cancelled runs get to end
SIGNAL_CHECK_S = 0.1               # the main thread's longest wait: Ctrl-C is taken between two
HUB_STOP_TIMEOUT_S = 1.0           # on shutdown, how long the writer gets to end every stream
RETRY_MS = 2000                    # the client's reconnection delay, sent as `retry:`
RETRY_AFTER_S = 2                  # Retry-After on 429 and 503
MAX_BODY_BYTES = 64 * 1024
HISTORY_LIMIT = 1000               # events a session holds for late joiners and resume
LISTEN_BACKLOG = 2048              # the kernel caps it at net.core.somaxconn
CATCH_UP_BATCH = 64                # events joined into one send for a lagging stream
WRITER_GATHER_S = 0.001            # when events come faster than one per this, the writer
                                   # lets them gather this long between turns (_StreamWriter._turn)
DIRECT_STREAMS = 8                 # a run with at most this many streams is written by the
                                   # thread that publishes (_StreamHub.published); past it,
                                   # or an event less than WRITER_GATHER_S after the run's
                                   # last, by the writer's one pass
PACED_WRITE_S = 0.02               # a paced stream (?pace=1, the page's) is written at most
                                   # this often, its progress events coalesced (_StreamWriter._due)
TLS_SEND_MAX = 16 * 1024           # bytes per TLS send: one record (see _StreamSockets.send)
TIMER_GRID_S = 0.02                # the writer's timers fire on a grid this fine, or of a
                                   # fiftieth of the keepalive if finer, not under 1 ms (_Timers)
TIMER_LONGEST_WAIT_S = 3600.0      # the writer looks at its timers at least this often
WRITER_MAX_FAILURES = 10          # unexpected errors in a row before the writer gives up
# select() watches a fixed set (FD_SETSIZE as CPython builds it): on Windows
# 512 sockets, elsewhere descriptors numbered below 1024. epoll, kqueue and
# poll have no such limit. Some descriptors are the server's own.
SELECT_LIMIT = 512 if sys.platform == "win32" else 1024
SELECT_HEADROOM = 64
# A non-blocking send that would block. Under TLS it raises its own errors:
# SSLWantWriteError when the socket is full, SSLWantReadError when TLS needs
# the peer's bytes first (a renegotiation, which the server's context refuses).
WOULD_BLOCK = (BlockingIOError, InterruptedError) + (
    (ssl.SSLWantWriteError, ssl.SSLWantReadError) if ssl else ())
GRIP_QUEUE_LIMIT = 10000           # items waiting for Pushpin; beyond, new ones are dropped
GRIP_BATCH = 200                   # items per publish request
GRIP_INTERVAL_S = 0.1              # at most one publish this often; a run's events in between
                                   # go as one item (Pushpin's work is items x viewers)
GRIP_TIMEOUT_S = 3.0               # one publish request gives up
GRIP_LINK_TIMEOUT_S = 10           # Pushpin asks for what a quiet held stream missed this
                                   # often: a stream whose tail was lost still ends soon
GRIP_RUNS_CHANNEL = "runs-without-ids"   # the runs list as a page's run stream carries it

ESTIMATE_FROM_RUNS = 20            # a queued run's estimated start: the mean of these many
                                   # last completed runs
TOKEN_BYTES = 16                   # session ids and control keys: 128 random bits
RUNS_LIMIT = 100                   # runs listed by GET /runs, newest first
LOG_MESSAGE_LIMIT = 64 * 1024      # characters of one `log` event's message
LOG_LEVELS = ("info", "warning", "error")

SESSION_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
TERMINAL_STATES = frozenset(("complete", "cancelled", "error"))   # event name = state
EVENT_NAMES = TERMINAL_STATES | {"queued", "progress", "log"}
# How an `error` came, as data the page reads (not its English): a program's
# `exit_code` or `signal`, and `reason: "interrupted"` when the server stopped.
END_FIELDS = ("exit_code", "signal", "reason")
# Names the server sets: an event's own, /status's (which holds the latest
# progress fields beside them) and an end's. A run's field never takes one.
RESERVED_FIELDS = frozenset(("iteration", "total", "percent", "elapsed_s", "ts", "result",
                             "message", "level", "stream", "stage", "bars", "session_id",
                             "state", "params", "position", "title", "reported") + END_FIELDS)
# A run's pace as its program tells it: the rate's unit (batch/s) and its own
# time left. A job may send them; they go with the rate and the time left.
PACE_FIELDS = ("rate_unit", "eta_s")
NOT_CHARTED = RESERVED_FIELDS.union(END_FIELDS, PACE_FIELDS)   # the rest are the job's fields


###############################################################################
# Event encoding: pure functions, bytes out
###############################################################################

# Strict JSON on one line: no NaN or Infinity, and no raw newline, so a single
# `data:` line always suffices.
_JSON_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


class _ThreadEncoder(threading.local):
    """Each thread's own C encoder for _json_line, with its own markers (the
    ids of the containers being encoded, which find a circular reference
    at once): a thread never sees another's, and a failed encode, which
    leaves its markers behind, clears them."""

    def __init__(self):
        self.markers = {}
        self.encode = json.encoder.c_make_encoder(
            self.markers, _JSON_ENCODER.default, json.encoder.encode_basestring_ascii, None,
            ":", ",", False, False, False)   # indent, separators, sort, skip keys, NaN


_THREAD_ENCODER = _ThreadEncoder() if json.encoder.c_make_encoder else None


def _json_line(value):
    """`value` as strict JSON on one line, as _JSON_ENCODER.encode makes it.

    Every event is encoded here, so the encoder is made once (per thread):
    JSONEncoder.encode builds a new C encoder on every call, and a third of
    an event's encoding went there. A value nested too deeply raises the
    ValueError that bad JSON does (it was a RecursionError no caller
    expected)."""
    if _THREAD_ENCODER is None:        # a Python built without the _json module
        return _JSON_ENCODER.encode(value)
    encoder = _THREAD_ENCODER
    try:
        return "".join(encoder.encode(value, 0))
    except RecursionError:
        encoder.markers.clear()
        raise ValueError("nested too deeply") from None
    except BaseException:
        encoder.markers.clear()
        raise


def _json_value(text):
    """json.loads, where JSON nested too deeply for the parser (a
    RecursionError, from about a thousand levels) is a ValueError like any
    other bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply")


def _hundredths(value):
    """`value` rounded to two decimals, as round(value, 2) rounds it but in
    a quarter of the time (with digits, round() goes through a decimal
    string): every event's percent and elapsed_s. The two can differ in the
    last digit only where `value * 100` is a tie that binary rounding
    moved: every percent of every count up to 2,000 comes out the same.
    A value whose hundredths a float cannot hold goes to round() as it is
    (infinity, say, which the event's JSON then refuses, naming the field)."""
    hundredths = value * 100
    return round(hundredths) / 100 if math.isfinite(hundredths) else round(value, 2)


def _frame_event(event_id, name, data_json):
    """An event's fields around its data, already encoded as one JSON line."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), data_json)


def _encode_chunk(payload):
    """One HTTP/1.1 chunk (RFC 9112, section 7.1): size in hex, CRLF, data, CRLF."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _without_id(sse):
    """An event's SSE bytes without their `id:` line: a client's last event
    id stays as it was (WHATWG HTML, "Server-sent events": an event with
    no id field leaves it). How a run's stream carries the runs list."""
    return sse[sse.index(b"\n") + 1:]


RETRY = b"retry: %d\n\n" % RETRY_MS
KEEPALIVE = b": keepalive\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def _name_bad_field(data, error):
    """Say which field of `data` is not strict JSON."""
    for name, value in data.items():
        try:
            _json_line(value)
        except (TypeError, ValueError) as exc:
            return "field %r is not JSON-serialisable: %s" % (name, exc)
    return str(error)


class _Event:
    """A published event, encoded once for every socket it goes to (and
    for the record and the journal, which reuse its JSON)."""

    __slots__ = ("id", "name", "chunk", "terminal", "_sse", "_json")

    def __init__(self, event_id, name, data):
        self.id = event_id
        self.name = name
        self._json = _json_line(data).encode()
        self._sse = _frame_event(event_id, name, self._json)
        self.chunk = _encode_chunk(self._sse)
        self.terminal = name in TERMINAL_STATES
        if self.terminal:
            self.chunk += LAST_CHUNK      # the terminal event ends the body

    @property
    def sse(self):
        """The event's SSE bytes: the chunk's data (HTTP/1.0, Pushpin)."""
        if self._sse is None:
            start = self.chunk.index(b"\r\n") + 2
            self._sse = self.chunk[start:start + int(self.chunk[:start - 2], 16)]
        return self._sse

    @property
    def json(self):
        """The event's data as one JSON line: the SSE data field's value."""
        if self._json is None:
            sse = self.sse
            self._json = sse[sse.index(b"\ndata: ") + 7:-2]
        return self._json

    def held(self):
        """The event as a run's history holds it: a plain tuple of its id,
        name and chunk, which the garbage collector stops tracking (a
        server with hundreds of runs holds hundreds of thousands of events;
        held as objects, every full collection walked them all, a third of
        a second, every few seconds). The chunk is the only copy of the
        payload kept: the SSE bytes and the JSON are read back out of it by
        the few readers that want them."""
        return (self.id, self.name, self.chunk)

    @classmethod
    def from_held(cls, held):
        event = cls.__new__(cls)
        event.id, event.name, event.chunk = held
        event._sse = event._json = None
        event.terminal = event.name in TERMINAL_STATES
        return event


###############################################################################
# A run's whole record: its series and its events, bounded
###############################################################################

SERIES_BUCKETS = 4096              # buckets a run's series keeps; past it, pairs merge
SERIES_FIELDS = 64                 # fields a run's series charts; later new ones are not
SERIES_POINTS_DEFAULT = 1000       # GET /series?points=N: default, and its bounds
SERIES_POINTS_MIN = 10
SERIES_POINTS_MAX = 5000
RECORD_ITEM_OVERHEAD = 100         # bytes a kept event costs beyond its JSON line
RECORD_PIECE_BYTES = 65536         # /log and /export are sent in pieces of about this size
# The export lines /log shows: log events (and markers of lines dropped), and
# the run's end.
LOG_TEXT_EVENTS = re.compile(rb'\{"id":[0-9a-z]*,"event":"log"')   # what /log shows


def _numeric_fields(data):
    """The job's own numeric fields of an event: what the chart draws."""
    return {name: value for name, value in data.items() if name not in NOT_CHARTED
            and not isinstance(value, bool) and isinstance(value, (int, float))}


def _merged_values(ours, theirs):
    """Two buckets' values as one: per field the lower min, the higher max
    and the later last (`theirs` is the later bucket). None where a bucket
    has no value of that field."""
    size = max(len(ours), len(theirs))
    ours += (None,) * (size - len(ours))
    theirs += (None,) * (size - len(theirs))
    values = []
    for k in range(0, size, 3):
        if theirs[k + 2] is None:
            values += ours[k:k + 3]
        elif ours[k + 2] is None:
            values += theirs[k:k + 3]
        else:
            values += (min(ours[k], theirs[k]), max(ours[k + 1], theirs[k + 1]), theirs[k + 2])
    return tuple(values)


def _merge_buckets(buckets, factor):
    """Buckets of `factor` times the width: neighbours merged, in order."""
    merged = {}
    for index in sorted(buckets):
        bucket = buckets[index]
        target = merged.get(index // factor)
        merged[index // factor] = bucket if target is None else \
            (target[0],) + _merged_values(target[1:], bucket[1:])
    return merged


class _Series:
    """Every numeric field over the whole run in bounded memory: buckets of
    equal iteration width, each with the first iteration it holds and, per
    field, its min, max and last value. When the run outgrows SERIES_BUCKETS
    buckets the width doubles and neighbours merge pairwise, so a spike
    survives as a bucket's max however long the run. Guarded by its
    session's lock.

    A bucket is one tuple of numbers: the first iteration, then the min, max
    and last of each field, in the order of `names` (None where it has no
    value of a field). The garbage collector stops tracking a tuple that
    holds only numbers, and a server with hundreds of runs holds hundreds
    of thousands of buckets: held as lists, or as dicts, they made every
    full collection walk them (a third of a second, every few seconds)."""

    def __init__(self):
        self.width = 1
        self.names = []            # the fields' names, in the order they first came
        self._slots = {}           # name -> its place in `names`
        self.buckets = {}          # index -> (first iteration, min, max, last per name...)
        self.last_id = 0
        self._shape = ()           # the names of the last event's fields, in its order,
        self._charted = []         # and of those the ones a chart may draw

    def add(self, event_id, data):
        """An event's numeric fields at its iteration (_numeric_fields)."""
        self.last_id = event_id
        iteration = data.get("iteration")
        if isinstance(iteration, bool) or not isinstance(iteration, (int, float)):
            return
        index = int(max(0, iteration) // self.width)
        if index < SERIES_BUCKETS and index not in self.buckets:
            row = self._row_like_last(iteration, data)
            if row is not None:
                self.buckets[index] = row
                return
        self._add_fields(iteration, index, _numeric_fields(data))

    def _row_like_last(self, iteration, data):
        """The usual event's new bucket, made in half the time: an event with
        the same fields as the one before, in the same order, and every field
        a chart draws a plain int or float, and all of them charted already.
        None when the event is not that one."""
        shape = tuple(data)
        if shape != self._shape:
            self._shape = shape
            self._charted = [name for name in shape if name not in NOT_CHARTED]
        if not self._charted or self._charted != self.names:
            return None
        row = [iteration]
        for name in self._charted:
            value = data[name]
            if type(value) is not float and type(value) is not int:
                return None
            row += (value, value, value)
        return tuple(row)

    def _add_fields(self, iteration, index, fields):
        if not fields:
            return
        while index >= SERIES_BUCKETS:
            self.buckets = _merge_buckets(self.buckets, 2)
            self.width *= 2
            index //= 2
        bucket = self.buckets.get(index)
        slots = [(3 * self._slot(name), value) for name, value in fields.items()
                 if name in self._slots or len(self.names) < SERIES_FIELDS]
        bucket = bucket or (iteration,)
        values = list(bucket[1:]) + [None] * (3 * len(self.names) - len(bucket) + 1)
        for k, value in slots:
            if values[k + 2] is None:
                values[k] = values[k + 1] = value
            else:
                values[k], values[k + 1] = min(values[k], value), max(values[k + 1], value)
            values[k + 2] = value
        self.buckets[index] = (bucket[0],) + tuple(values)

    def _slot(self, name):
        """The field's place in `names`, given it one if it is new."""
        if name not in self._slots:
            self._slots[name] = len(self.names)
            self.names.append(name)
        return self._slots[name]

    def _by_name(self, values):
        """A bucket's values as {name: [min, max, last]}, for the fields it has."""
        return {name: list(values[3 * k:3 * k + 3]) for k, name in enumerate(self.names)
                if 3 * k + 2 < len(values) and values[3 * k + 2] is not None}

    def state(self):
        """What the journal keeps of it, so a restart reads it back whole."""
        return {"width": self.width, "last_id": self.last_id,
                "buckets": [[i, bucket[0], self._by_name(bucket[1:])]
                            for i, bucket in sorted(self.buckets.items())]}

    @classmethod
    def from_state(cls, state):
        series = cls()
        series.width, series.last_id = state["width"], state["last_id"]
        for _, _, kept in state["buckets"]:
            for name in kept:
                series._slot(name)
        for i, first, kept in state["buckets"]:
            values = [None] * (3 * len(series.names))
            for name, (low, high, last) in kept.items():
                k = 3 * series._slot(name)
                values[k:k + 3] = low, high, last
            series.buckets[i] = (first,) + tuple(values)
        return series

    def answer(self, points):
        """What GET /series answers: at most `points` buckets of equal width."""
        factor = 1
        while self.buckets and max(self.buckets) // factor >= points:
            factor *= 2
        buckets = _merge_buckets(self.buckets, factor) if factor > 1 else self.buckets
        order = sorted(buckets)
        fields = {}
        for k, name in sorted(enumerate(self.names), key=lambda slot: slot[1]):
            parts = {"min": [], "max": [], "last": []}
            for index in order:
                values = buckets[index][1:]
                kept = values[3 * k:3 * k + 3] if 3 * k + 2 < len(values) else (None,) * 3
                for part, value in zip(("min", "max", "last"), kept):
                    parts[part].append(value)
            if any(value is not None for value in parts["last"]):
                fields[name] = parts
        return {"iterations": [buckets[i][0] for i in order], "width": self.width * factor,
                "fields": fields, "last_id": self.last_id}


def _export_line(event_id, name, data_json):
    """One /export (and journal) line: {"id", "event", "data"}; the data is the
    event's own JSON, not encoded again."""
    return b'{"id":%s,"event":"%s","data":%s}\n' % (
        b"null" if event_id is None else b"%d" % event_id, name.encode(), data_json)


def _export_line_of(kept):
    """A record item's /export line: made from a held event, or a marker's own."""
    if type(kept) is not tuple:
        return kept
    event = _Event.from_held(kept)
    return _export_line(event.id, event.name, event.json)


def _first_after(items, number):
    """The index of the first of `items` whose first element is above
    `number`, by halving: the items are in the order of that element (an
    event id, or a record line's sequence number), which only goes up, but
    not always by one. Run ids jump: a run read back after a crash goes on
    past its journal's id mark (a queued run), or ends there (an
    interrupted one); a record's lines go when it is thinned."""
    low, high = 0, len(items)
    while low < high:
        middle = (low + high) // 2
        if items[middle][0] <= number:
            low = middle + 1
        else:
            high = middle
    return low


class _Record:
    """Every event of a run, for /log and /export, in at most `budget`
    bytes. Past the budget, progress events are thinned first (every other
    one, the newest kept); then log lines from the middle of the run go,
    and a `warning` line in their place says how many. Guarded by its
    session's lock; `changed` wakes /log?follow readers.

    An event is kept as the history holds it, the same (id, name, chunk)
    tuple, so an event that is in both costs its bytes once and adding one
    costs an append; its /export line is made when it is read. A marker of
    lines dropped is kept as its /export line.

    Each item has a sequence number, which only goes up; a reader keeps the
    number it reads from next, not a place in the list, because thinning
    removes items before that place. The marker takes the number of the
    last item it stands for, so a reader that had not reached them reads
    it."""

    def __init__(self, budget_bytes, lock):
        self.budget = budget_bytes
        self.items = []            # (sequence, held event tuple, or a marker's export line)
        self.end = 0               # the sequence number of the next item
        self.size = 0
        self.dropped_logs = 0
        self.changed = threading.Condition(lock)
        self.readers = 0           # /log?follow readers waiting on `changed`

    def add(self, held):
        self.items.append((self.end, held))
        self.end += 1
        self.size += len(held[2]) + RECORD_ITEM_OVERHEAD
        if self.size > self.budget:
            self._shrink()
        if self.readers:
            self.changed.notify_all()

    def _shrink(self):
        progress = [i for i, (_, kept) in enumerate(self.items[:-1])
                    if type(kept) is tuple and kept[1] == "progress"]
        if len(progress) >= 2:
            drop = set(progress[-2::-2])      # every other one, never the newest
            self.items = [item for i, item in enumerate(self.items) if i not in drop]
        else:
            self._drop_middle_logs()
        self.size = sum(len(kept[2] if type(kept) is tuple else kept) + RECORD_ITEM_OVERHEAD
                        for _, kept in self.items)

    def _drop_middle_logs(self):
        """Drop a quarter of the items from the middle; one marker stands for
        all that were ever dropped there."""
        count = len(self.items)
        start, stop = count // 2 - count // 8, count // 2 + count // 8
        if stop - start < 1:
            return
        gone = self.items[start:stop]
        self.dropped_logs += sum(1 for _, kept in gone if type(kept) is tuple and kept[1] == "log")
        first = _export_line_of(gone[0][1])
        marker = _export_line(None, "log", _json_line({
            "message": "%d log lines dropped here: the run's record is over --max-record-mb "
                       "(the server's memory limit for it)" % self.dropped_logs,
            "level": "warning",
            "ts": json.loads(first.decode())["data"].get("ts", time.time())}).encode())
        self.items[start:stop] = [(gone[-1][0], marker)]

    def lines_after(self, position):
        """(the export lines numbered `position` on, the next position). The
        items are copied under the session's lock, and their lines made as
        they are read, after it: a 16 MB record's lines are not made while
        the run waits to publish."""
        items = self.items[_first_after(self.items, position - 1):]
        return (_export_line_of(kept) for _, kept in items), self.end


def _log_text_line(record):
    """One /log line from an export record: ISO 8601 UTC time with
    milliseconds, level, [stream], message; further lines indented by two."""
    data = record["data"]
    stamp = data.get("ts")
    when = "-"
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        seconds, millis = divmod(int(stamp * 1000), 1000)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis
    parts = [when, str(data.get("level", "info"))]
    if data.get("stream"):
        parts.append("[%s]" % data["stream"])
    message = str(data.get("message", "")).replace("\r\n", "\n").replace("\n", "\n  ")
    return (" ".join(parts) + " " + message + "\n").encode("utf-8", "replace")


###############################################################################
# Sessions: one run, its history and its state
###############################################################################

EVENT_ONLY_FIELDS = ("elapsed_s", "ts", "message", "result")   # of one event, not of the run


def _lasting_fields(data):
    """An event's data without what belongs to that event alone (its stamps,
    message and result): what a terminal event carries over from the latest
    progress."""
    return {k: v for k, v in data.items() if k not in EVENT_ONLY_FIELDS}


def _latest_after(latest, data):
    """A run's latest fields once an event brings `data`: the standard ones
    (iteration, total, percent, stage, bars, eta_s...) are this event's, and
    each of the job's own fields keeps its latest value until a newer value
    of it comes, so a progress() without fields blanks no card, /status or
    terminal event. `rate_unit` goes with `rate`. Changes and returns
    `latest`, in a time that does not grow with its fields (a program may
    name a new field in every line). The usual event has every field the
    latest has: one look-up each, no loop over the standard names."""
    if latest.keys() <= data.keys():
        latest.update(data)
        return latest
    for name in NOT_CHARTED:
        if name in latest and name not in data and not (
                name == "rate_unit" and "rate" in latest and "rate" not in data):
            del latest[name]
    latest.update(data)
    return latest


class _CancelFlag:
    """A run's cancel flag: `is_set()`, `set()` and `wait(timeout)`, as on
    the threading.Event a job may be handed, at a fraction of the cost of
    a wait.

    A job waits once an event or more (the built-in one waits out each
    tick on it, so that Cancel ends a long tick at once). Event.wait makes
    a new lock and takes a condition's lock on every call; hundreds of
    runs at ten events a second spent a few points of a core there. Here
    a wait is one acquire, with its timeout, of a lock held from the
    start: set() releases it, and each waiter that gets it through
    releases it again for the next."""

    def __init__(self):
        self._set = False
        self._setting = threading.Lock()
        self._gate = threading.Lock()
        self._gate.acquire()

    def is_set(self):
        return self._set

    def set(self):
        with self._setting:
            if not self._set:
                self._set = True
                self._gate.release()

    def wait(self, timeout=None):
        """True once set; False when `timeout` seconds pass first."""
        if self._set:
            return True
        if self._gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._gate.release()
            return True
        return self._set


class _RunSink:
    """What a run's events are published into, as the job's `Progress`, a
    program's output reader (`_CommandOutput`) and its runner
    (`_run_program`) use it: the server's run (`_Session`), or on a
    reporting machine the `_Outbox` that posts them to one. Written down,
    because the reporter's stand-in once died on a member it lacked."""

    cancel = None          # a flag: is_set(), wait(timeout), set()
    stop_reason = None     # why the server, not a user, stops the run

    def publish(self, name, data):
        """Publish an event; it (or None once the run has ended). Raises
        TypeError, naming the field, for data that is not strict JSON."""
        raise NotImplementedError

    def latest_fields(self):
        """The run's latest progress fields, without one event's stamps."""
        raise NotImplementedError

    def note_process(self, identity):
        """A program started for the run (see _process_identity)."""


class _RunListener:
    """What reacts to runs: the stream writer, the runs feed, the Pushpin
    publisher, the journal, the notifier, the queue and the reported runs
    each keep their own state of a run, and hear of it through these
    methods (no-ops here), called for every run by the run and by the
    registry. The rule for all, stated once: `event` is called under the
    run's lock, in id order, so it must never block, never wait for a lock
    that a publishing thread could hold, and never publish."""

    def event(self, session, event):
        """A run published `event` (under the run's lock)."""

    def published(self, session, event):
        """The same, after the run's lock, by the thread that published it:
        events of one run may come here out of id order (two threads
        publishing). Never blocks."""

    def process(self, session, identity):
        """A run's program started (--cmd; see _process_identity)."""

    def ended(self, session):
        """A run's terminal event is out (after its lock), heard here
        before `published` hears of it: counts and the queue have moved on
        before any stream can show the end."""

    def forgotten(self, session):
        """A run has expired: whatever is kept for it goes."""


class _Listeners:
    """Listeners of runs, each method's in a list of its own, of the ones
    that define it: an event costs a call per listener that wants it."""

    def __init__(self, listeners):
        for method in ("event", "published", "process", "ended", "forgotten"):
            setattr(self, method, [getattr(listener, method) for listener in listeners
                                   if getattr(type(listener), method)
                                   is not getattr(_RunListener, method)])


class _Session(_RunSink):
    """One run: its events, its state, its cancel flag and its control key.

    Any thread may publish (a job's own threads, a command's output readers):
    the lock makes each event's id the next one and its place in the history
    the same. The writer thread and /status read under the lock too; a single
    attribute such as `terminal_id` or `last_id` is read without it, which is
    safe in CPython (one reference load) and at worst one event stale.
    """

    def __init__(self, session_id, title, params, listeners, record_bytes=16 * 2 ** 20,
                 state="running", history_bytes=None):
        self.id = session_id
        self.control_key = secrets.token_urlsafe(TOKEN_BYTES)
        self.view_key = secrets.token_urlsafe(TOKEN_BYTES)   # lets its holder watch this run
        self.report_key = None        # a run reported from elsewhere: the key its reporter posts with
        self.title = title
        self.params = params
        self.cancel = _CancelFlag()
        self.started = time.monotonic()   # when it began running: events' elapsed_s count
        self.started_ts = time.time()     # from here; this is when it was accepted
        self.began_ts = None              # when it began running: then, or once out of the queue
        self.ended_at = None          # monotonic time of the terminal event
        self.ended_ts = None
        self._listeners = listeners   # a _Listeners: who hears of its events and its end
        self._lock = threading.Lock()  # guards history, last_id, terminal_id, state, latest,
                                       # series and record
        self._history = collections.deque(maxlen=HISTORY_LIMIT)
        self._history_bytes = history_bytes   # a bound on the history's bytes too (runs feed)
        self._held_bytes = 0
        self.series = _Series()
        self.record = _Record(record_bytes, self._lock) if record_bytes else None   # 0: none
        self.last_id = 0
        self.terminal_id = None
        self.state = state            # "queued" (waiting for a slot), "running", then terminal
        self.position = None          # while queued: 1 = the next to start (RunQueue sets it)
        self.place_told = None        # the position its last `queued` event gave
        self._latest = {}             # the latest progress (or terminal) event's data
        self.worker = None            # the thread running the job
        self.stop_reason = None       # set when the server, not a user, stops the run
        self.id_mark = None           # with a journal: the mark its ids stay within (IdMark)
        self.ids_may_pass_end = False  # clients may hold ids past its end (see resume_after)

    def publish(self, name, fields, place=None):
        """Stamp, encode and record one event, then tell the writers. Returns
        the event, or None once the run has ended (a straggling thread of the
        job's cannot add to a finished stream).

        A `queued` event gives the run's `place` in line: it is dropped when
        the run has left the queue, or when it is not nearer the front than
        the place last told (places only ever go down, so that is stale news
        from a slower thread).

        Raises TypeError (naming the field) when the fields are not strict
        JSON; nothing is recorded then.
        """
        data = dict(fields)
        data["elapsed_s"] = _hundredths(time.monotonic() - self.started)
        event = None
        while event is None:
            if self.id_mark is not None:
                self.id_mark.keep_ahead()
            data["ts"] = time.time()
            with self._lock:
                if self.terminal_id is not None:
                    return None
                if place is not None:
                    if self.state != "queued" or (self.place_told is not None
                                                  and place >= self.place_told):
                        return None
                    self.place_told = place
                # Another thread may have taken the last id below the mark
                # since: then wait for the next mark, outside the lock.
                if self.id_mark is None or self.id_mark.covers(self.last_id + 1):
                    event = self._append(name, data)
        if event.terminal:             # counts and the queue move on before a stream
            for tell in self._listeners.ended:     # can show the end
                tell(self)
        for tell in self._listeners.published:
            tell(self, event)
        return event

    def _append(self, name, data):
        """The next event, with the lock held."""
        try:
            event = _Event(self.last_id + 1, name, data)
        except (TypeError, ValueError) as exc:
            raise TypeError(_name_bad_field(data, exc))
        self._keep(event, data)
        if event.terminal:
            self.terminal_id = event.id
            self.state = name
            self.ended_at = time.monotonic()
            self.ended_ts = data["ts"]
        # Inside the lock, so that the writer, Pushpin and the journal get
        # the events in id order whichever threads publish them.
        for tell in self._listeners.event:
            tell(self, event)
        return event

    def note_process(self, identity):
        """--cmd: the run's program started (the journal keeps it, so a
        restart after a crash can end it)."""
        for tell in self._listeners.process:
            tell(self, identity)

    def time_left(self):
        """Seconds until the run ends, from its latest percent; None before it
        has made any."""
        percent = self._latest.get("percent")
        if not isinstance(percent, (int, float)) or not 0 < percent <= 100:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (100.0 - percent) / percent

    def mark_running(self):
        """The run leaves the queue (or never joined it): its clock starts."""
        with self._lock:
            self.state = "running"
            self.position = None
            self.started = time.monotonic()

    def _keep(self, event, data, record=True):
        """Add a new event to the history, the series and the record."""
        held = event.held()
        if self._history_bytes is None:
            self._history.append(held)
        else:
            self._hold_within_bytes(held)
        self.last_id = event.id
        if event.name == "queued":
            pass      # its place in the queue: not a progress field, not a point
        elif event.name != "log":
            self._latest = _latest_after(self._latest, data)
            self.series.add(event.id, data)
        else:
            self.series.last_id = event.id
        if record and self.record is not None:
            self.record.add(held)

    def _hold_within_bytes(self, held):
        """Hold the event, then drop the oldest past `history_bytes`; the
        newest stays whatever its size."""
        history = self._history
        if len(history) == history.maxlen:
            self._held_bytes -= len(history[0][2])     # the append drops it
        history.append(held)
        self._held_bytes += len(held[2])
        while self._held_bytes > self._history_bytes and len(history) > 1:
            self._held_bytes -= len(history.popleft()[2])

    def series_state(self):
        with self._lock:
            return self.series.state()

    def series_answer(self, points):
        with self._lock:
            return self.series.answer(points)

    def record_lines(self, position=0):
        """(the /export lines from `position` on, the next position)."""
        with self._lock:
            return self.record.lines_after(position)

    def wait_for_record(self, position, timeout):
        """Wait until the record holds more than `position` lines or the run
        has ended, at most `timeout` seconds."""
        with self._lock:
            if self.record.end <= position and self.terminal_id is None:
                self.record.readers += 1
                try:
                    self.record.changed.wait(timeout)
                finally:
                    self.record.readers -= 1

    def record_ended(self, position):
        """Has the run ended, and has a reader at `position` read its record whole?"""
        return self.terminal_id is not None and position >= self.record.end

    def holds_control_key(self, key):
        """Is `key` this run's control key? Compared in constant time, so
        timing does not reveal the key."""
        return key is not None and hmac.compare_digest(key.encode("utf-8", "replace"),
                                                       self.control_key.encode())

    def holds_report_key(self, key):
        """Is `key` this reported run's report key? Compared in constant time."""
        return key is not None and self.report_key is not None and hmac.compare_digest(
            key.encode("utf-8", "replace"), self.report_key.encode())

    def holds_view_key(self, key):
        """Is `key` this run's view key? Compared in constant time."""
        return hmac.compare_digest(key.encode("utf-8", "replace"), self.view_key.encode())

    def replay(self, events, latest=None):
        """Events read back from the journal, (id, name, data) oldest first:
        into the history and the series, not the record (that stays on
        disk). A terminal one ends the run as it ended then. `latest`: the
        fields of the whole journal, where one may be older than `events`."""
        with self._lock:
            for event_id, name, data in events:
                self._keep(_Event(event_id, name, data), data, record=False)
            self._latest = _latest_after(dict(latest or {}), self._latest)
            if events and events[-1][1] in TERMINAL_STATES:
                self.terminal_id, self.state = self.last_id, events[-1][1]
                self.ended_ts = events[-1][2].get("ts", time.time())
                self.ended_at = time.monotonic() - max(0.0, time.time() - self.ended_ts)
                self.cancel.set()

    def skip_ids(self, event_id):
        """The next event's id goes past `event_id` (a run read back from its
        journal goes on past the journal's id mark)."""
        with self._lock:
            self.last_id = max(self.last_id, event_id)

    def latest_fields(self):
        """The run's latest progress fields (see _latest_after), without the
        last event's stamps."""
        with self._lock:
            return _lasting_fields(self._latest)

    def snapshot(self):
        """What /status answers: the state, the parameters, the place in the
        queue and the latest event's fields."""
        with self._lock:
            data = dict(self._latest)     # the run's own names cannot hide the state
            data.update({"session_id": self.id, "state": self.state, "params": self.params,
                         "position": self.position, "title": self.title,
                         "reported": self.report_key is not None})
        return data

    def summary(self):
        """What /runs lists of this run (never its control key). Its
        `last_event_id` says how new it is: a list that hears of a run from
        both GET /runs and the runs feed keeps the newer entry."""
        with self._lock:      # _latest changes in place
            latest = {k: self._latest[k] for k in ("iteration", "total", "percent") + END_FIELDS
                      if k in self._latest}
            state, position, last_id = self.state, self.position, self.last_id
        summary = {"session_id": self.id, "title": self.title, "state": state,
                   "started_ts": self.started_ts, "began_ts": self.began_ts,
                   "ended_ts": self.ended_ts,
                   "iteration": latest.get("iteration"), "total": latest.get("total"),
                   "percent": latest.get("percent"), "params": self.params, "position": position,
                   "last_event_id": last_id, "reported": self.report_key is not None,
                   "stream": "/progress/" + self.id, "status": "/status/" + self.id}
        if state == "error":           # how it failed, for a list that says "interrupted"
            summary.update((k, latest[k]) for k in END_FIELDS if k in latest)
        return summary

    def events_after(self, event_id, limit):
        """Up to `limit` held events with an id above `event_id`, oldest first.
        Events that fell out of the history are skipped: for a lagging reader,
        the oldest are dropped first and the terminal one never is."""
        return [_Event.from_held(event) for event in self.held_after(event_id, limit)]

    def held_after(self, event_id, limit):
        """events_after's events as the history holds them, (id, name,
        chunk): what the stream writer sends, with nothing made per event."""
        with self._lock:
            history = self._history            # held events: (id, name, chunk)
            if not history:
                return []
            if history[-1][0] == event_id + 1:
                return [history[-1]]           # the newest alone: a live stream's usual turn
            start = max(0, event_id + 1 - history[0][0])
            if start < len(history) and history[start][0] != max(event_id + 1, history[0][0]) \
                    or start >= len(history) and history[-1][0] > event_id:
                start = _first_after(history, event_id)   # ids with a gap: see _first_after
            stop = min(len(history), start + limit)
            return [history[i] for i in range(start, stop)]

    def resume_after(self, last_event_id):
        """The id after which a client's stream starts, or None when it holds
        the terminal event already (204). A client may hold ids past the
        terminal one when the run was read back from a journal that lost
        its last events and ended it there (a disk too slow for its id
        marks, then a crash): that client has not seen the terminal event,
        so it gets it."""
        if last_event_id is None:
            return 0
        if self.terminal_id is not None and last_event_id >= self.terminal_id:
            if self.ids_may_pass_end and last_event_id > self.terminal_id:
                return self.terminal_id - 1
            return None
        return min(last_event_id, self.last_id)


def _end_run(session, name, extra):
    """Publish the terminal event: the latest progress fields plus `extra`.
    A run the server stopped (it is shutting down) ends `error`, saying so,
    not `cancelled`: nobody cancelled it."""
    if name == "cancelled" and session.stop_reason:
        name, extra = "error", {"message": session.stop_reason, "reason": "interrupted"}
    fields = session.latest_fields()
    for field in END_FIELDS:           # they say how this end came, not an earlier one
        fields.pop(field, None)
    if name == "complete" and fields.get("total"):
        fields["iteration"] = fields["total"]
        fields["percent"] = 100.0
        if isinstance(fields.get("bars"), list):     # every level is done, not one restarted
            fields["bars"] = [dict(bar, done=bar["total"]) if bar.get("total") else bar
                              for bar in fields["bars"]]
    fields.update(extra)
    try:
        session.publish(name, fields)
    except (TypeError, ValueError) as exc:
        fields.pop("result", None)
        fields["message"] = "the job's result is not JSON-serialisable: %s" % exc
        session.publish("error", fields)


def _new_session_id():
    """128 random bits, URL-safe, never starting with `-`: a command line
    would read `--run -Xy...` as two options."""
    while True:
        session_id = secrets.token_urlsafe(TOKEN_BYTES)
        if not session_id.startswith("-"):
            return session_id


class _TooBusy(Exception):
    """A limit is reached: too many running sessions (429), open streams or
    threads (503). The handler answers with the status and Retry-After."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class _Registry(_RunListener):
    """Every known session: creates within the cap, looks up, forgets ended
    sessions after their time to live, and cancels all on shutdown. Its
    runs tell `listeners` (and first the registry itself, of their end)."""

    def __init__(self, max_sessions, session_ttl_s, listeners, record_bytes=16 * 2 ** 20,
                 job_limit=None):
        self.max_sessions = max_sessions  # runs going on at once, reported ones included,
        self.job_limit = job_limit        # unless a queue bounds the server's own: then this
        self.record_bytes = record_bytes
        self.session_ttl_s = session_ttl_s
        self.listeners = _Listeners([self] + list(listeners))
        self._lock = threading.Lock()    # guards _sessions, _ended, _running, _reported
        self._sessions = {}
        self._ended = collections.deque()  # sessions in the order they ended
        self._running = 0                # sessions not ended (queued ones too),
        self._reported = 0               # of which runs reported from elsewhere

    def create(self, title, params, state="running", session_id=None, within_limit=True,
               report_key=None):
        """A new session; raises TooBusy at its cap, unless it is a run read
        back (a restart with a lower cap still keeps it). A run reported
        from elsewhere (`report_key`) counts toward --max-sessions alone;
        the server's own runs toward the queue's bound when there is one."""
        with self._lock:
            self._expire()
            own = self.job_limit is not None and report_key is None
            limit = self.job_limit if own else self.max_sessions
            counted = self._running - self._reported if own else \
                self._reported if self.job_limit is not None else self._running
            if within_limit and counted >= limit:
                raise _TooBusy(429, "too many running sessions (limit %d); try again later"
                               % limit)
            session = _Session(session_id or _new_session_id(), title, params, self.listeners,
                               self.record_bytes, state)
            session.report_key = report_key
            self._sessions[session.id] = session
            self._count(session, 1)
            return session

    def _count(self, session, step):
        self._running += step
        if session.report_key is not None:
            self._reported += step

    def discard(self, session):
        """Forget a session whose worker never started."""
        with self._lock:
            if self._sessions.pop(session.id, None) is not None and session.ended_at is None:
                self._count(session, -1)

    def get(self, session_id):
        with self._lock:
            self._expire()
            return self._sessions.get(session_id)

    def counts(self):
        """(sessions known, runs running, runs waiting in the queue)."""
        with self._lock:
            self._expire()
            queued = sum(1 for s in self._sessions.values() if s.state == "queued")
            return len(self._sessions), self._running - queued, queued

    def newest(self, limit):
        """The `limit` most recently started sessions, newest first."""
        with self._lock:
            self._expire()
            sessions = list(self._sessions.values())   # in the order they started
        return list(reversed(sessions))[:limit]

    def running(self):
        with self._lock:
            return [s for s in self._sessions.values() if s.ended_at is None]

    def viewed_by(self, key):
        """The session whose view key this is, or None. Every key is
        compared, in constant time, so the answer's timing tells nothing."""
        with self._lock:
            self._expire()
            sessions = list(self._sessions.values())
        found = None
        for session in sessions:
            if session.holds_view_key(key):
                found = session
        return found

    def ended(self, session):
        with self._lock:
            if session.id in self._sessions:
                self._count(session, -1)
                self._ended.append(session)

    def _expire(self):
        """Forget ended sessions past their TTL. Called with the lock held, on
        every look-up, so a server with no thread for it still stays flat."""
        cutoff = time.monotonic() - self.session_ttl_s
        while self._ended and self._ended[0].ended_at <= cutoff:
            session = self._ended.popleft()
            self._sessions.pop(session.id, None)
            for tell in self.listeners.forgotten:     # (none may block: the lock is held)
                tell(session)

    def restore(self, sessions):
        """Take in ended sessions read back from the journal, oldest first."""
        with self._lock:
            for session in sorted(sessions, key=lambda s: s.ended_at):
                self._sessions[session.id] = session
                self._ended.append(session)
            self._sessions = dict(sorted(self._sessions.items(),
                                         key=lambda item: item[1].started_ts))


###############################################################################
# The queue: at most N runs at once (--concurrency), the rest first in, first out
###############################################################################

class _RunQueue(_RunListener):
    """Which runs run. Without a limit every run starts at once. With
    --concurrency N at most N run; the others wait in order, and each hears
    of its place: a `queued` event (its position) when it joins and whenever
    the position changes, in the run's own id sequence. Events are published
    after the queue's lock (`_announce`), and a place is published only when
    it is nearer the front than the last one told, so a run's positions
    never go back. Lock order: the queue's, then a session's."""

    def __init__(self, concurrency, max_queue, start_run):
        self.concurrency = concurrency or 0     # 0: no limit
        self.max_queue = max_queue
        self._start_run = start_run             # starts a run's worker; raises if it cannot
        self._lock = threading.Lock()           # guards _waiting, _running, _durations, _stopped
        self._starting = threading.RLock()      # runs start one at a time, in the queue's order,
                                                # outside _lock (a run's own thread then waits
                                                # for the journal's disk, under no lock)
        self._waiting = collections.deque()
        self._running = set()
        self._durations = collections.deque(maxlen=ESTIMATE_FROM_RUNS)
        self._held = True        # until the server serves: see release()
        self._stopped = False

    def would_wait(self):
        with self._lock:
            return self._is_full()

    def check_room(self):
        """Raises TooBusy (429) when a new run would find the queue full."""
        with self._lock:
            if self._is_full() and len(self._waiting) >= self.max_queue:
                raise _TooBusy(429, "the queue is full (%d runs waiting); try again later"
                               % len(self._waiting))

    def _is_full(self):
        return bool(self.concurrency) and (len(self._running) >= self.concurrency
                                           or bool(self._waiting))

    def submit(self, session):
        """Start the run now, or queue it: True when it waits (the caller
        then tells it its place, after its own locks: see tell_place). A
        run that cannot start now raises what start_run raised. The slot is
        taken under the lock, the run started after it: /start, /status and
        the runs feed must not wait behind a start."""
        with self._lock:
            if self._is_full() or self._held or self._stopped:
                self._waiting.append(session)
                session.position = len(self._waiting)
                return True
            self._running.add(session)       # its slot, taken now
        with self._starting:
            try:
                self._start_run(session)
            except BaseException:
                self._free(session)
                raise
        return False

    def tell_place(self, session):
        """A run that joined the queue hears its place, unless it has left
        the queue already. Its `queued` event may wait for the journal's
        disk (its id mark): never under a lock. A place that a faster
        thread has bettered, or a run that has started, is dropped by
        publish()."""
        with self._lock:
            if session not in self._waiting:
                return
            places = [(session, session.position, self._estimates(session.position)[-1])]
        self._announce(places)

    def _free(self, session):
        with self._lock:
            self._running.discard(session)

    def withdraw(self, session):
        """Take a queued run out of the queue (it is being cancelled); False
        if it is not waiting (it has started, or ended)."""
        with self._lock:
            if session not in self._waiting:
                return False
            place = self._waiting.index(session)
            del self._waiting[place]
            session.position = None          # PROTOCOL: null for a run not in the queue
            places = self._new_places(place)
        self._announce(places)
        return True

    def release(self):
        """The server serves: the runs that waited in the queue when it last
        stopped (read back into it while it started) start, as many as have
        a slot. Not before: a Ctrl-C while a large --state-dir is read back
        stops the server before it serves, and those runs stay queued
        (their programs had started, only to be stopped at once)."""
        with self._lock:
            self._held = False
        self._start_waiting()

    def ended(self, session):
        """A run has ended: its slot goes to the next in line."""
        with self._starting:
            with self._lock:
                if session in self._running:
                    self._running.discard(session)
                    if session.state == "complete":
                        self._durations.append(session.ended_at - session.started)
            self._start_waiting()

    def _start_waiting(self):
        """The first in line start, as many as have a slot, one at a time in
        order, each after the lock (see submit). A run that cannot start
        ends `error` (its end comes back here, and the slot goes on down
        the line)."""
        with self._starting:
            starting = []
            with self._lock:
                while self._waiting and not (self._held or self._stopped) and \
                        not self._is_running_full():
                    next_run = self._waiting.popleft()
                    next_run.position = None
                    self._running.add(next_run)
                    starting.append(next_run)
                places = self._new_places(0) if starting else []
            self._announce(places)
            for run in starting:
                try:
                    self._start_run(run)
                except Exception as exc:     # that run fails; the queue goes on
                    self._free(run)
                    log.error("run %s could not start: %s", run.id, exc)
                    _end_run(run, "error", {"message": "the run could not start: %s" % exc})

    def _is_running_full(self):
        return bool(self.concurrency) and len(self._running) >= self.concurrency

    def _new_places(self, first):
        """With the lock held: the runs from index `first` on moved up one
        place. [(session, position, estimate)] for _announce."""
        moved = list(self._waiting)[first:]
        estimates = self._estimates(first + len(moved))[first:]
        places = []
        for position, (session, estimate) in enumerate(zip(moved, estimates), first + 1):
            session.position = position
            places.append((session, position, estimate))
        return places

    @staticmethod
    def _announce(places):
        """Publish each run's new place, after the queue's lock: a long queue
        never holds up a start or a run's end. A place that a faster thread
        has already bettered is dropped by publish()."""
        for session, position, estimate in places:
            data = {"position": position}
            if estimate is not None:
                data["estimated_start_s"] = estimate
            session.publish("queued", data, place=position)

    def estimated_start_s(self, session):
        """Seconds until a queued run starts, or None (not queued, or nothing
        to go by). A running run frees its slot when its percent says it
        will (elapsed x (100 - p) / p), or else at the mean duration of the
        last runs that completed; each queued run ahead then takes a slot
        for that mean."""
        with self._lock:
            if session.position is None or session not in self._waiting:
                return None
            return self._estimates(session.position)[-1]

    def _estimates(self, count):
        """Estimated starts of the first `count` places, in one pass: each
        slot frees up in turn, and the run it takes holds it for the mean.
        Before any run has completed, the running runs' projected durations
        (elapsed + time left) stand in for the mean."""
        if not self.concurrency:
            return [None] * count
        now = time.monotonic()
        lefts = [(run, run.time_left()) for run in self._running]
        durations = self._durations or [now - run.started + left for run, left in lefts
                                        if left is not None]
        mean = sum(durations) / len(durations) if durations else None
        free_at = [0.0] * max(0, self.concurrency - len(self._running))
        for run, left in lefts:
            if left is None and mean is not None:
                left = max(0.0, mean - (now - run.started))
            free_at.append(float("inf") if left is None else left)
        heapq.heapify(free_at)
        estimates = []
        for _ in range(count):
            start = heapq.heappop(free_at)
            known = start != float("inf")
            estimates.append(round(start, 1) if known else None)
            heapq.heappush(free_at, start + mean if known and mean is not None else float("inf"))
        return estimates

    def stop(self):
        """Shutdown: no run starts any more; the queued ones stay queued."""
        with self._lock:
            self._stopped = True


###############################################################################
# The runs list, pushed: GET /runs/events
###############################################################################

RUNS_FEED_ID = "runs"              # the runs list's own session: no run's id is this short
RUNS_FEED_INTERVAL_S = 0.25        # the runs list's changes go out at most this often
RUNS_FEED_HISTORY_BYTES = 2 ** 20  # what the feed holds for a returning page: a page reads
                                   # GET /runs whenever it (re)connects, so little is needed


class _RunsFeed(_RunListener):
    """The runs panel's stream. Every event of every run marks that run
    changed; one thread publishes, at most every RUNS_FEED_INTERVAL_S, a
    `runs` event with the changed runs' entries (as GET /runs gives them)
    and the ids of runs forgotten since. The events live in a Session of
    their own that never ends, so the stream writer serves it like a run's:
    ids, resume with Last-Event-ID, keepalives. Quiet runs cost nothing:
    the thread sleeps until a run changes. Nor does a feed nobody reads:
    while no stream follows it, changes wait (the thread looks again each
    interval), and a stream that starts publishes them first, so hundreds
    of busy runs describe themselves only for a page that shows them."""

    def __init__(self, describe, listeners, followed):
        self.session = _Session(RUNS_FEED_ID, "runs", {}, listeners,
                                record_bytes=0, history_bytes=RUNS_FEED_HISTORY_BYTES)
        self._describe = describe           # session -> its entry in the runs list
        self._is_followed = followed        # session -> whether a stream follows it now
        self.key = secrets.token_urlsafe(TOKEN_BYTES)   # Pushpin's own requests for it carry
                                                        # this (behind a token; see _grip_hold)
        self._lock = threading.Lock()       # guards _changed, _gone
        self._publishing = threading.Lock() # one publish at a time, so a run's entries go
                                            # out in the order they were described
        self._changed = {}                  # session id -> session, in the order they changed
        self._gone = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = None

    def start(self, supervisor):
        self._thread = supervisor.spawn("runs feed", self._run)

    def event(self, session, event):
        """A run published an event (any thread, never blocks). A run already
        marked changed costs one look-up: the thread describes it as it is
        when it publishes, so this event is in what it tells."""
        if session.id in self._changed:
            return
        with self._lock:
            self._changed[session.id] = session
        if not self._wake.is_set():
            self._wake.set()

    def forgotten(self, session):
        """A run has expired: the panel drops it. Told only while a stream
        follows the list: a page that follows it later reads GET /runs
        first, so ids kept for nobody would only grow (a server no page
        watches: CI, an API)."""
        followed = self._is_followed(self.session)
        with self._lock:
            self._changed.pop(session.id, None)
            if followed:
                self._gone.add(session.id)
        self._wake.set()

    def stop(self):
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def _run(self):
        while not self._stopping.is_set():
            self._wake.wait()
            if self._is_followed(self.session):
                self._wake.clear()
                self.publish_changes()
            self._stopping.wait(RUNS_FEED_INTERVAL_S)   # what changes meanwhile goes in one event

    def publish_changes(self):
        """Publish what changed since the last time (the feed's thread, and a
        new follower's handler, which must not miss what was waiting)."""
        with self._publishing:
            with self._lock:
                changed, gone = list(self._changed.values()), sorted(self._gone)
                self._changed, self._gone = {}, set()
            if changed or gone:
                self.session.publish("runs", {"runs": [self._describe(s) for s in changed],
                                              "gone": gone})


###############################################################################
# Background threads: one supervision for all
###############################################################################

def _counted(number, noun):
    """"1 run", "2 runs": a count in a log line."""
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def _describe_exception(exc):
    text = str(exc).strip()
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


class _Supervisor:
    """Starts the server's long-lived threads (the stream writer, the
    journal, the GRIP publisher) and watches them. A thread whose body
    raises has stopped: it is logged once with its traceback, and /healthz
    answers 503 naming the part. A loop that can go on after an unexpected
    error calls `survived` instead: logged once per part with its
    traceback, counted, and the loop goes on."""

    def __init__(self):
        self._lock = threading.Lock()     # guards stopped, errors
        self.stopped = {}                 # part -> why its thread ended
        self.errors = {}                  # part -> unexpected errors it went on after

    def spawn(self, part, target):
        thread = threading.Thread(target=self._watch, args=(part, target), daemon=True,
                                  name=part.replace(" ", "-"))
        thread.start()
        return thread

    def _watch(self, part, target):
        try:
            target()
        except BaseException as exc:     # a thread has no one to re-raise to
            log.error("the %s has stopped", part, exc_info=True)
            with self._lock:
                self.stopped[part] = _describe_exception(exc)

    def survived(self, part):
        """Call from an `except Exception:` block of a loop that goes on."""
        with self._lock:
            self.errors[part] = self.errors.get(part, 0) + 1
            first = self.errors[part] == 1
        if first:
            log.error("the %s met an unexpected error and goes on (logged once)", part,
                      exc_info=True)
        else:
            log.debug("the %s met an unexpected error again", part, exc_info=True)

    def problems(self):
        """{part: why it stopped} for the parts that no longer run."""
        with self._lock:
            return dict(self.stopped)


###############################################################################
# Streams: one writer thread for every subscriber socket
###############################################################################

def _is_tls(sock):
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def _coalesced(held):
    """What a paced stream sends of a batch of held events: all but the
    progress events that the batch's newest one stands for (it says where
    the run is now); a log line, a place in the queue and the terminal
    event are each news of their own, and keep their order."""
    newest = next((event for event in reversed(held) if event[1] == "progress"), None)
    return [event for event in held if event[1] != "progress" or event is newest]


class _Connection:
    """A socket the writer thread holds: a subscriber's open stream (how far
    it has got), or a parked keep-alive connection.

    `cursor` is the id of the last event queued for it; `pending` the bytes
    its socket has not accepted yet. Owned by the writer thread, which a
    publishing thread may stand in for (see _StreamHub.published). An `idle`
    one is parked, waiting for its next request: its stream has ended, or it
    never had one (`session` is None).

    A page's stream may also carry the runs list (`?runs=1`): `feed` is then
    the runs feed's session and `feed_cursor` how far it has got there; and
    it may be paced (`?pace=1`): past `paced_from` (the run's last event when
    it opened; the history goes as on any stream), `paced_until` is when it
    may next be written (see _StreamWriter._due).
    """

    __slots__ = ("sock", "address", "session", "cursor", "chunked", "keep_alive",
                 "pending", "last_write", "blocked_since", "idle", "closed",
                 "reading", "writing", "due", "tls", "tls_wants_read",
                 "feed", "feed_cursor", "paced_from", "paced_until", "lock")

    def __init__(self, sock, address, session, cursor, chunked, keep_alive):
        self.sock = sock
        self.address = address
        self.session = session
        self.cursor = cursor
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.pending = b""
        self.last_write = time.monotonic()
        self.blocked_since = None   # when its socket last refused bytes, if it still holds some
        self.idle = False           # the stream has ended; the connection waits for a request
        self.closed = False
        self.reading = False        # the selector watches it for end of file
        self.writing = False        # the selector watches it for room to write
        self.due = None             # when its timer fires; other heap entries are stale
        self.tls = _is_tls(sock)
        self.tls_wants_read = False  # a TLS send waits for the peer's bytes, not for room
        self.feed = None
        self.feed_cursor = 0
        self.paced_from = 0
        self.paced_until = None      # None: not paced
        self.lock = threading.Lock()   # held by whichever thread writes it (see _StreamHub)

    def frames(self, held):
        """Held events' bytes for this stream: their chunks, or for HTTP/1.0
        their SSE bytes."""
        if self.chunked:
            return b"".join([event[2] for event in held])
        return b"".join([_Event.from_held(event).sse for event in held])

    def keepalive_frame(self):
        return _encode_chunk(KEEPALIVE) if self.chunked else KEEPALIVE

    def has_terminal(self):
        return self.session.terminal_id is not None and self.cursor >= self.session.terminal_id

    def end_body(self):
        """Best effort, without blocking: the rest of what is pending and the
        last chunk, then close."""
        self.closed = True
        try:
            self.sock.setblocking(False)
            self.sock.send(bytes(self.pending) + (LAST_CHUNK if self.chunked else b""))
        except OSError:
            pass
        self.sock.close()


class _Inbox:
    """Work for the writer thread, posted by any other thread, and the socket
    pair that wakes the writer's select(). An item posted with `once` (a
    session with new events) is not queued again until the writer takes it,
    so a fast job can never grow the inbox past the number of sessions. Once
    closed (a `stop` was taken, or the writer gave up) it takes nothing more."""

    def __init__(self):
        self._lock = threading.Lock()   # guards _items, _once, _woken, closed
        self._items = collections.deque()
        self._once = set()              # `once` keys of items not taken yet
        self._woken = False             # a wake-up byte is on its way
        self.closed = False
        self.wake_r, self._wake_w = socket.socketpair()   # the writer selects on wake_r
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def post(self, item, once=None):
        """Queue an item and wake the writer; False once closed."""
        with self._lock:
            if self.closed:
                return False
            if once is not None:
                if once in self._once:
                    return True
                self._once.add(once)
            self._items.append(item)
            wake = not self._woken
            self._woken = True
        if wake:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, InterruptedError):
                pass    # the buffer is full of wake-ups already
            except OSError:
                pass    # closed: nothing is listening any more
        return True

    def hold_wakeups(self):
        """(The writer) it will take the inbox soon of its own accord: until
        then a post need not send a wake-up byte (a system call for the
        publisher, and one more for the writer)."""
        with self._lock:
            self._woken = True

    def take(self, woken):
        """(The writer) everything posted so far; a `stop` among it closes
        the inbox: what is queued still runs, nothing more comes. `woken`:
        select() found wake-up bytes to read (one per wake-up, see _woken).
        Otherwise none is read: a byte that comes after the select wakes
        the next one, which finds the inbox empty or not."""
        if woken:
            try:
                self.wake_r.recv(4096)
            except (BlockingIOError, InterruptedError):
                pass
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._once.clear()
            self._woken = False
            if ("stop", None) in items:
                self.closed = True
        return items

    def close(self):
        """Take nothing more; what is left, for the writer to end."""
        with self._lock:
            self.closed = True
            items = list(self._items)
            self._items.clear()
        return items

    def release(self):
        self.wake_r.close()
        self._wake_w.close()


class _Timers:
    """One timer per subscriber (its keepalive, its stuck-reader check or
    its idle timeout), in a heap. Re-arming a timer leaves the old entry in
    the heap; it is skipped when it comes up, as its due time is no longer
    the subscriber's.

    A timer due further off than `grid_s` is put off to the next multiple
    of it, so that timers due close together fire in one wake-up of the
    writer: a stream's keepalive timer comes up once a keepalive interval
    even while events flow (it then finds the stream busy and re-arms), and
    hundreds of streams woke the writer hundreds of times a second, each
    for one timer. A quiet stream's keepalives then come every interval
    and a grid step: the step is small (20 ms at most), as a coarser one
    would stretch every interval by it. A timer due within PACED_WRITE_S
    (a paced stream's next write) is never put off."""

    def __init__(self, grid_s):
        self._heap = []                 # (due, seq, subscriber)
        self._seq = itertools.count()
        self._grid_s = grid_s
        self._exact_within = max(grid_s, PACED_WRITE_S)

    def arm(self, sub, due):
        if due - time.monotonic() > self._exact_within:
            due = math.ceil(due / self._grid_s) * self._grid_s
        sub.due = due
        heapq.heappush(self._heap, (due, next(self._seq), sub))

    def delay(self):
        """Seconds to the next timer (at most TIMER_LONGEST_WAIT_S: select()
        refuses a timeout of weeks), or None when there is none."""
        if not self._heap:
            return None
        return min(TIMER_LONGEST_WAIT_S, max(0.0, self._heap[0][0] - time.monotonic()))

    def fired(self, now):
        """The subscribers whose timer is due. They are all taken off the
        heap before any is handled, so a timer re-armed for a time that has
        come already waits for the next pass instead of firing again in
        this one, for ever."""
        subs = []
        while self._heap and self._heap[0][0] <= now:
            due, _, sub = heapq.heappop(self._heap)
            if not sub.closed and due == sub.due:
                subs.append(sub)
        return subs

    def subscribers(self):
        return [sub for _, _, sub in self._heap]


def _selector_capacity(selector):
    """How many sockets the selector can watch: select()'s fixed set size, or
    None for epoll, kqueue and poll, which have no such limit."""
    return SELECT_LIMIT if isinstance(selector, selectors.SelectSelector) else None


class _StreamSockets:
    """The connections the writer holds: which run each stream follows
    (`by_session`, which the publishing threads read too), the selector
    that watches their sockets, their timers, and how bytes go out, how a
    stream ends, how an idle connection waits for its next request
    (parked) and how a connection closes. The writer thread's alone."""

    def __init__(self, hub, keepalive_s, idle_timeout_s, resume_connection):
        self._hub = hub                      # counts the streams
        self.idle_timeout_s = idle_timeout_s
        self._resume_connection = resume_connection   # a parked connection's next request
        self.selector = selectors.DefaultSelector()
        self.capacity = _selector_capacity(self.selector)   # sockets it can watch, or None
        self.timers = _Timers(max(0.001, min(TIMER_GRID_S, keepalive_s / 50)))
        self.by_session = {}                 # session -> {subscriber: None}

    def send(self, sub):
        """Non-blocking sends until the socket is full; True when all of
        `pending` went out.

        Under TLS a send writes whole records or nothing, and one that would
        block must be repeated with the same bytes: `pending` only ever grows
        at its end, so sending at most TLS_SEND_MAX bytes from its start
        repeats them. It also keeps each send to one record, so a socket
        with some room takes what fits instead of nothing."""
        while True:
            piece = sub.pending[:TLS_SEND_MAX] if sub.tls else sub.pending
            try:
                sent = sub.sock.send(piece)
            except WOULD_BLOCK as exc:
                sent = 0
                sub.tls_wants_read = ssl is not None and isinstance(exc, ssl.SSLWantReadError)
            except OSError as exc:
                self.close(sub, exc)
                return False
            now = time.monotonic()
            if sent:
                sub.last_write = now
                sub.blocked_since = None
            if sent == len(sub.pending):
                sub.pending = b""
                if sub.writing:
                    self.update_selector(sub, sub.reading, writing=False)
                return True
            sub.pending = memoryview(sub.pending)[sent:]
            if sent < len(piece):
                break
        if sub.blocked_since is None:
            sub.blocked_since = now
        if sub.tls_wants_read:
            self.update_selector(sub, reading=True, writing=False)
        else:
            self.update_selector(sub, sub.reading, writing=True)
        return False

    def on_readable(self, sub):
        """End of file means the client has gone. Bytes mean its next request:
        a stream leaves them in the kernel until it ends; an idle connection
        goes back to the HTTP server to answer it. True when a TLS send
        waited for the peer's bytes: the writer tries it again. (The peek
        looks at the TCP bytes under TLS too: TLS has no peek, and reading
        would take the request. A TLS client that says goodbye with
        close_notify before it closes is noticed at the next write that
        fails, a keepalive at the latest.)"""
        if sub.tls_wants_read:
            sub.tls_wants_read = False
            return True
        try:
            data = socket.socket.recv(sub.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(sub, exc)
            return
        if not data:
            self.close(sub, "client closed the connection")
        elif sub.idle:
            self.resume(sub)
        else:
            self.update_selector(sub, reading=False, writing=sub.writing)

    def end_stream(self, sub):
        """The terminal event is out: keep the connection for the client's next
        request (HTTP/1.1 keep-alive) or close it."""
        self.forget(sub)
        if not sub.keep_alive:
            self.close(sub)
            return
        sub.idle = True
        if sub.reading:
            self.keep_parked(sub)
        else:
            self.resume(sub)   # a request is already waiting

    def keep_parked(self, sub):
        """An idle connection: watched for its next request, closed when it
        has been quiet for the idle timeout. Under select(), only while that
        leaves room for every stream the cap still allows."""
        if self.capacity is not None and not sub.reading and len(self.selector.get_map()) + \
                self._hub.max_streams - self._hub.streams >= self.capacity:
            self.close(sub, "no room to watch an idle connection")
            return
        self.update_selector(sub, reading=True, writing=sub.writing)
        self.timers.arm(sub, sub.last_write + self.idle_timeout_s)

    def resume(self, sub):
        """A parked connection's next request has come: back to the HTTP
        server, which answers it in a new thread."""
        self.update_selector(sub, reading=False, writing=False)
        sub.closed = True
        try:
            sub.sock.setblocking(True)
            self._resume_connection(sub.sock, sub.address)
        except Exception:
            log.exception("could not resume a parked connection in the HTTP server")
            sub.sock.close()

    def forget(self, sub):
        """Stop counting a stream (once) and drop it from its session."""
        if sub in self.by_session.get(sub.session, ()):
            for session in (sub.session, sub.feed):
                subs = self.by_session.get(session, {})
                subs.pop(sub, None)
                if not subs:
                    self.by_session.pop(session, None)
            self._hub.release()

    def close(self, sub, reason=None, end_body=False):
        """Close a connection; with `end_body`, first send (without blocking)
        what is pending and the last chunk."""
        if sub.closed:
            return
        if reason is not None:
            log.debug("stream to %s closed: %s", sub.address[0], reason)
        self.forget(sub)
        self.update_selector(sub, reading=False, writing=False)
        if end_body:
            sub.end_body()
            return
        sub.closed = True
        try:
            sub.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sub.sock.close()

    def update_selector(self, sub, reading, writing):
        """Watch the socket for end of file and/or room to write."""
        old = (selectors.EVENT_READ if sub.reading else 0) | \
              (selectors.EVENT_WRITE if sub.writing else 0)
        new = (selectors.EVENT_READ if reading else 0) | \
              (selectors.EVENT_WRITE if writing else 0)
        sub.reading, sub.writing = reading, writing
        if old == new:
            return
        if not old:
            self.selector.register(sub.sock, new, sub)
        elif not new:
            self.selector.unregister(sub.sock)
        else:
            self.selector.modify(sub.sock, new, sub)


class _StreamWriter:
    """The writer thread: its loop (a select() over every stream's socket
    and the inbox's wake-up), the events each stream gets next, and its
    timers (keepalives, stuck readers, idle connections). The sockets
    themselves, and the map of who follows which run, are its
    `_StreamSockets`."""

    def __init__(self, hub, inbox, keepalive_s, idle_timeout_s, resume_connection):
        self._hub = hub                      # counts the streams
        self._inbox = inbox
        self.keepalive_s = keepalive_s
        self.stuck_s = STUCK_KEEPALIVES * keepalive_s
        self.sockets = _StreamSockets(hub, keepalive_s, idle_timeout_s, resume_connection)
        self.sockets.selector.register(inbox.wake_r, selectors.EVENT_READ, None)
        self.broken = None                   # why the writer stopped taking streams, if it did
        self.stopping = False
        self._serving = None                 # the connection being served, closed if that fails
        self._work = collections.deque()     # inbox items taken, not yet done
        self._last_events_turn = 0.0         # when a turn last wrote events (see _turn)
        self._gathering = False              # the next select is a pause while events gather
        self._idless_chunks = {}             # runs feed event id -> its chunk without id (_idless)

    def run(self):
        failures = 0
        while not self.stopping:
            try:
                self._turn()
                failures = 0
            except Exception:
                failures += 1
                self._survive(failures)
        self._close_everything()

    def _turn(self):
        """One wait and what it found: inbox work, ready sockets, due timers.

        Each turn that finds events costs a wake-up, and each wake-up three
        hand-offs of the interpreter's lock (the publisher's wake-up byte,
        the select, its recv) between threads that all want it. When events
        come faster than one every WRITER_GATHER_S (hundreds of runs at
        once), the writer lets them gather that long before its next turn:
        a turn then writes several. The rate is the runs a turn wrote over
        the time since the last turn that wrote, so a pause that gathered
        several is followed by another while the rate lasts. The pause is
        the next select's timeout, and the inbox holds its wake-ups
        meanwhile, so a publisher during the pause sends no byte and the
        writer reads none (sockets that turn ready still end the pause). An
        event that comes alone is written at once."""
        timeout = 0 if self._work else self.sockets.timers.delay()
        if self._gathering:
            timeout = WRITER_GATHER_S if timeout is None else min(timeout, WRITER_GATHER_S)
        for key, mask in self.sockets.selector.select(timeout):
            if key.data is None:
                self._drain_inbox(woken=True)
            else:
                self._serving = key.data
                self._on_ready(key.data, mask)
        if self._gathering:
            self._gathering = False
            self._drain_inbox(woken=False)
        wrote = self._do_work()
        self._run_timers()
        self._serving = None
        if wrote:
            now = time.monotonic()
            if now - self._last_events_turn < wrote * WRITER_GATHER_S:
                self._gathering = True       # the next select is the pause; posts
                self._inbox.hold_wakeups()   # meanwhile wake nobody
            self._last_events_turn = now

    def _survive(self, failures):
        """The writer met an exception nobody expected (a bug, a selector
        error, a socket in an odd state). Every other stream must go on: log
        it once with its traceback, close the connection it was serving, and
        carry on. After WRITER_MAX_FAILURES in a row it cannot be trusted:
        it stops taking streams, ends the open ones (browsers reconnect and
        get 503 instead of hanging) and /healthz says so."""
        sub, self._serving = self._serving, None
        log.error("the stream writer failed%s; it goes on without that connection",
                  " serving %s" % sub.address[0] if sub else "", exc_info=True)
        if sub is not None:
            try:
                with sub.lock:
                    self.sockets.close(sub, "the writer failed serving it")
            except Exception:
                log.debug("closing it failed too", exc_info=True)
        if failures >= WRITER_MAX_FAILURES:
            self.broken = "%d unexpected errors in a row" % failures
            log.error("the stream writer gives up: %s; new streams get 503", self.broken)
            self._work.extend(self._inbox.close())
            self.stopping = True

    def _drain_inbox(self, woken):
        self._work.extend(self._inbox.take(woken))
        if self._inbox.closed:
            self.stopping = True     # take nothing more; what is queued still runs

    def _do_work(self):
        """Inbox items, one at a time: if one fails, the rest stay for the
        next turn. Returns how many runs' new events it wrote."""
        wrote = 0
        while self._work:
            kind, value = self._work.popleft()
            self._serving = value if isinstance(value, _Connection) else None
            if kind == "events":
                wrote += 1
                self._write_new_events(value)
            elif kind == "attach":
                self._add(value)
            elif kind == "park":
                self.sockets.keep_parked(value)
        return wrote

    def _add(self, sub):
        with sub.lock:
            for session in (sub.session, sub.feed):
                if session is not None:
                    self.sockets.by_session.setdefault(session, {})[sub] = None
            self.sockets.update_selector(sub, reading=True, writing=False)
            self.sockets.timers.arm(sub, sub.last_write + self.keepalive_s)
            self._flush(sub)

    def _write_new_events(self, session):
        """Write a session's new events to its subscribers. Subscribers at the
        same place share one encoded batch; a subscriber still sending an
        earlier batch catches up when its socket has room (or now, when a
        publishing thread left it bytes it could not send)."""
        batches = {}
        for sub in list(self.sockets.by_session.get(session, ())):
            with sub.lock:
                if not sub.closed and not (sub.pending and sub.writing):
                    self._flush(sub, batches)

    def _flush(self, sub, batches=None):
        """Send what the socket accepts: pending bytes, then held events past
        the cursors (when a paced stream is due). Ends the stream once the
        terminal event is out."""
        self._serving = sub
        while not sub.closed:
            if not sub.pending:
                # _has_news, inline: this is every subscriber's path for every event.
                # Once the run's terminal event is out the body has ended: a
                # runs list change after it would be read as the next response.
                if sub.cursor >= sub.session.last_id and (
                        sub.feed is None or sub.feed_cursor >= sub.feed.last_id
                        or sub.has_terminal()) or \
                        sub.paced_until is not None and not self._due(sub):
                    break   # caught up (a later event comes with a notify), ended, or paced
                batch = self._batch_for(sub, {} if batches is None else batches)
                if not batch[0]:
                    break
                sub.pending, sub.cursor, sub.feed_cursor = batch
                if sub.paced_until is not None:
                    sub.paced_until = time.monotonic() + PACED_WRITE_S
            if not self.sockets.send(sub):
                return
        if not sub.closed and not sub.idle and sub.has_terminal():
            self.sockets.end_stream(sub)

    @staticmethod
    def _has_news(sub):
        return sub.cursor < sub.session.last_id or (
            sub.feed is not None and sub.feed_cursor < sub.feed.last_id
            and not sub.has_terminal())

    def _due(self, sub):
        """May a paced stream be written now? PACED_WRITE_S after its last
        write; sooner once its run has ended (Cancel shows at once), or when
        half the history has come since (it skips no more than an unpaced
        stream). When not, its timer is set for then."""
        if sub.cursor < sub.paced_from or time.monotonic() >= sub.paced_until or \
                sub.session.terminal_id is not None or \
                sub.session.last_id - sub.cursor >= HISTORY_LIMIT // 2:
            return True
        if sub.due is None or sub.due > sub.paced_until:
            self.sockets.timers.arm(sub, sub.paced_until)
        return False

    def _batch_for(self, sub, batches):
        """(bytes, cursor, feed cursor): the next events for `sub`, shared by
        the subscribers at the same place (run, id, feed id) in `batches`. A
        paced stream past its history takes all the history holds past its
        cursor, of which only the newest progress event (_coalesced); a
        stream that carries the runs list takes its events first (the run's
        terminal chunk ends the body)."""
        paced = sub.paced_until is not None and sub.cursor >= sub.paced_from
        # The run too: the runs feed's turn writes pages that follow any run
        key = (sub.session, sub.cursor, sub.chunked, sub.feed, sub.feed_cursor, paced)
        batch = batches.get(key)
        if batch is None:
            held = sub.session.held_after(sub.cursor, HISTORY_LIMIT if paced else CATCH_UP_BATCH)
            cursor = held[-1][0] if held else sub.cursor
            feed_cursor = sub.feed_cursor
            if sub.feed is not None:
                news = sub.feed.held_after(sub.feed_cursor, CATCH_UP_BATCH)
                feed_cursor = news[-1][0] if news else feed_cursor
                held = [self._idless(event) for event in news] + (
                    _coalesced(held) if paced else held)
            elif paced:
                held = _coalesced(held)
            batch = batches[key] = (sub.frames(held), cursor, feed_cursor)
        return batch

    def _idless(self, held):
        """A runs list event as a run's stream carries it (_without_id).
        Made once per event: the writer keeps the last few."""
        chunk = self._idless_chunks.get(held[0])
        if chunk is None:
            chunk = _encode_chunk(_without_id(_Event.from_held(held).sse))
            self._idless_chunks[held[0]] = chunk
            if len(self._idless_chunks) > CATCH_UP_BATCH:
                del self._idless_chunks[next(iter(self._idless_chunks))]
        return (held[0], held[1], chunk)

    def _on_ready(self, sub, mask):
        with sub.lock:
            if mask & selectors.EVENT_READ and self.sockets.on_readable(sub):
                self._flush(sub)          # a TLS send waited for the peer's bytes
            if mask & selectors.EVENT_WRITE and not sub.closed:
                self._flush(sub)

    # -- timers: keepalives, stuck readers, idle connections -----------------

    def _run_timers(self):
        now = time.monotonic()
        due_now = self.sockets.timers.fired(now)
        for i, sub in enumerate(due_now):
            self._serving = sub
            try:
                with sub.lock:
                    due = self._on_timer(sub, now)
            except Exception:         # _survive closes this one; the others stay timed
                for other in due_now[i + 1:]:
                    self.sockets.timers.arm(other, now)
                raise
            if due is not None:
                self.sockets.timers.arm(sub, due)

    def _on_timer(self, sub, now):
        """A subscriber's timer fired: returns when to look at it again."""
        if sub.idle:
            if now >= sub.last_write + self.sockets.idle_timeout_s:
                self.sockets.close(sub, "idle")
                return None
            return sub.last_write + self.sockets.idle_timeout_s
        if not sub.pending and self._has_news(sub):
            self._flush(sub)                 # a paced stream's pause is over
            if sub.closed or sub.idle:
                return None
        if sub.pending:
            if now >= sub.blocked_since + self.stuck_s:
                self.sockets.close(sub, "its socket accepted nothing for %.1f s" % self.stuck_s)
                return None
            return sub.blocked_since + self.stuck_s
        if now >= sub.last_write + self.keepalive_s:   # the due time's own sum: see fired()
            sub.pending = sub.keepalive_frame()
            self._flush(sub)
            if sub.closed:
                return None
            if sub.pending:
                return sub.blocked_since + self.stuck_s
        due = sub.last_write + self.keepalive_s
        return min(due, sub.paced_until) if self._has_news(sub) and sub.paced_until else due

    def _close_everything(self):
        """Shutdown: each stream gets what it can take of the end of its body
        without blocking, then every connection closes."""
        for subs in list(self.sockets.by_session.values()):
            for sub in list(subs):
                with sub.lock:
                    if not sub.closed:
                        self._flush(sub)
                    self.sockets.close(sub, end_body=True)
        for sub in self.sockets.timers.subscribers():
            self.sockets.close(sub)   # idle keep-alive connections
        self._work.extend(self._inbox.close())
        for kind, value in self._work:   # left over when the writer gave up
            if kind == "attach":
                self._hub.release()
                self.sockets.close(value, end_body=True)
            elif kind == "park":
                self.sockets.close(value)
        self.sockets.selector.close()
        self._inbox.release()


class _StreamHub(_RunListener):
    """Every open stream, as the server's other threads see it: they open
    one (`reserve`, then `attach`), park an idle keep-alive connection,
    publish events (`published`) and stop it all; they ask `followed`,
    `failure` and `can_watch`. What they hand over goes through the
    `_Inbox` to the `_StreamWriter`, the one thread that writes every
    stream that cannot take an event at once, with one exception: the
    thread that publishes an event writes it itself to a stream that can
    take it now (`published`), as nginx and Go's net/http write from the
    thread that has the bytes; whichever thread writes a stream holds its
    `lock`, and the publisher only ever tries it, so it never waits. The
    writer writes everything else: a stream that lags, a full socket, the
    keepalives, the end of a body.
    """

    def __init__(self, keepalive_s, idle_timeout_s, max_streams, resume_connection):
        self.keepalive_s = keepalive_s
        self._count_lock = threading.Lock()  # guards streams
        self.streams = 0
        self._inbox = _Inbox()
        self._writer = _StreamWriter(self, self._inbox, keepalive_s, idle_timeout_s,
                                     resume_connection)
        self._by_session = self._writer.sockets.by_session   # the writer's map (published)
        self.capacity = self._writer.sockets.capacity   # sockets select() can watch, or None
        self.max_streams = max_streams if self.capacity is None else \
            min(max_streams, self.capacity - SELECT_HEADROOM)
        self._last_published = {}            # session -> when its last event came (published)
        self._thread = None

    # -- called from other threads -------------------------------------------

    def start(self, supervisor):
        self._thread = supervisor.spawn("stream writer", self._writer.run)

    def reserve(self, sock):
        """Count a stream about to open on `sock`. Raises TooBusy past the cap,
        when the writer has stopped, or when select() could not watch it."""
        failure = self.failure()
        if failure is not None:
            raise _TooBusy(503, "the stream writer has stopped (%s); see the server log" % failure)
        if not self.can_watch(sock):
            raise _TooBusy(503, "too many open connections for select() on this platform")
        with self._count_lock:
            if self.streams >= self.max_streams:
                raise _TooBusy(503, "too many open streams (limit %d)" % self.max_streams)
            self.streams += 1

    def can_watch(self, sock):
        """select() cannot watch a descriptor numbered at or past its set size."""
        return self.capacity is None or sys.platform == "win32" or sock.fileno() < self.capacity

    def failure(self):
        """Why the writer is not writing, or None while it is."""
        writer = self._writer
        if writer.broken is None and self._thread is not None and \
                not self._thread.is_alive() and not writer.stopping:
            writer.broken = "the writer thread ended"
        return writer.broken

    def release(self):
        with self._count_lock:
            self.streams -= 1

    def attach(self, subscriber):
        """Take over a stream whose response head is written (and reserved).
        Once the hub has stopped, the stream ends at once."""
        if not self._inbox.post(("attach", subscriber)):
            self.release()
            subscriber.end_body()

    def park(self, sock, address):
        """Keep an idle keep-alive connection until its next request arrives
        (it then goes back to the HTTP server) or it has been quiet for the
        idle timeout (it is closed)."""
        connection = _Connection(sock, address, session=None, cursor=0, chunked=True,
                                 keep_alive=True)
        connection.idle = True
        if not self.can_watch(sock) or not self._inbox.post(("park", connection)):
            sock.close()

    def followed(self, session):
        """Whether a stream follows `session` now (any thread: one look-up in
        the writer's own map, at worst a turn out of date)."""
        return session in self._by_session

    def published(self, session, event):
        """A session has a new event: written here, by the publishing thread
        (after the run's lock: no socket is written under it), to each of its
        streams that can take it whole now, so an event costs no hand-off to
        the writer, no wake-up and no wait. The writer is told of the rest:
        a stream that lags or has this event already on its way, every
        event of a run with more than DIRECT_STREAMS streams (one pass of
        its own, one encoding), an event that comes less than
        WRITER_GATHER_S after the run's last (a job publishing flat out
        would otherwise pay a send per event per stream, where the writer
        joins what gathered into one send), and a terminal event (it ends
        the bodies). Coalesced: the inbox holds a session at most once, so
        a fast job can never grow it past the session count. A run no stream
        follows costs nothing: a stream that the writer adds after this
        look-up finds the event in the history (it is there before the
        look-up, and the writer reads the history after it adds the stream)."""
        subs = self._by_session.get(session)       # the writer's map: a look-up
        if subs is None:
            return
        if event.terminal:          # after ended(), which dropped the run's time below
            self._inbox.post(("events", session), once=session)
            return
        # The time between the run's own events, as they reach here: a slow
        # writer cannot make a run look fast.
        now = time.monotonic()
        since = now - self._last_published.get(session, 0.0)
        self._last_published[session] = now
        if len(subs) <= DIRECT_STREAMS and since >= WRITER_GATHER_S:
            written = True
            for sub in tuple(subs):
                written = self._write_now(sub, event, now) and written
            if written:
                return
        self._inbox.post(("events", session), once=session)

    def ended(self, session):
        self._last_published.pop(session, None)

    def forgotten(self, session):
        self._last_published.pop(session, None)   # a straggling publisher's, after the end

    @staticmethod
    def _write_now(sub, event, now):
        """Send `event` to `sub` from the publishing thread, if it is the
        stream's next and nothing waits ahead of it; True when all of it
        went (or the stream needs nothing of it). The stream's lock is only
        tried: if the writer holds it, the writer writes. So does it what the
        socket does not take (left `pending`), and an event that comes here
        before the one ahead of it (its cursor says so): the order on the
        wire is always the ids'."""
        if sub.cursor != event.id - 1 or sub.feed is not None or sub.paced_until is not None \
                or sub.tls or not sub.lock.acquire(False):
            return sub.cursor >= event.id and sub.feed is None
        try:
            if sub.cursor != event.id - 1 or sub.pending or sub.closed or sub.idle:
                return sub.cursor >= event.id
            data = event.chunk if sub.chunked else event.sse
            try:
                sent = sub.sock.send(data)
            except WOULD_BLOCK:
                sent = 0
            except Exception:             # OSError, or worse: never the publisher's
                return False              # problem; the writer meets it too, and closes it
            sub.cursor = event.id
            if sent:
                sub.last_write = now
            if sent == len(data):
                return True
            sub.pending = memoryview(data)[sent:]
            sub.blocked_since = now
            return False
        finally:
            sub.lock.release()

    def stop(self, timeout):
        """End every stream (with the terminal chunk) and the writer thread."""
        self._inbox.post(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)


###############################################################################
# Behind Pushpin: GRIP (https://pushpin.org/docs/protocols/grip/)
###############################################################################

def _merge_items(items):
    """The items with each run's consecutive events joined into one: its
    content is theirs in order, its prev-id the first one's and its id the
    last one's, so Pushpin's gap check reads it as one step. A close, or an
    event that does not follow the one before, stays an item of its own."""
    runs = {}
    for item in items:
        merged = runs.setdefault(item["channel"], [])
        last = merged[-1]["formats"]["http-stream"] if merged else {}
        this = item["formats"]["http-stream"]
        if "content" in last and "content" in this and "prev-id" in item and \
                item["prev-id"] == merged[-1].get("id"):
            merged[-1] = dict(merged[-1], id=item["id"],
                              formats={"http-stream": {"content": last["content"] + this["content"]}})
        else:
            merged.append(item)
    return [item for merged in runs.values() for item in merged]


class _GripPublisher(_RunListener):
    """Publishes every event to Pushpin as an `http-stream` item on the
    session's channel, from one thread with a bounded queue, so that a slow or
    absent Pushpin never blocks a job. At most one publish request goes out
    every GRIP_INTERVAL_S, and a run's events queued in between go as one
    item: Pushpin's work is items times held streams, so a run that publishes
    20 events a second to 2,000 viewers costs it 20,000 deliveries a second,
    not 40,000. What cannot be published is counted and logged once per
    outage; clients recover it by resuming."""

    @staticmethod
    def check_url(publish_url):
        parts = urllib.parse.urlsplit(publish_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("--grip wants http://host:port of Pushpin's publish endpoint")
        return parts

    def __init__(self, publish_url):
        parts = self.check_url(publish_url)
        self._address = (parts.hostname, parts.port or 80)
        self._path = parts.path.rstrip("/") + "/publish/"
        self._queue = queue.Queue(GRIP_QUEUE_LIMIT)
        self._conn = None
        self.published = 0
        self.failed = 0
        self._failing = False     # logged this outage already
        self._thread = None
        self._supervisor = None
        self._offered_lock = threading.Lock()   # guards _offered
        self._offered = {}        # session id -> the last event id offered to Pushpin

    def start(self, supervisor):
        self._supervisor = supervisor
        self._thread = supervisor.spawn("grip publisher", self._run)

    def offered(self, session):
        """The last event of the session offered to Pushpin (sent, or dropped
        on the way): a join through Pushpin is answered up to here (see
        _grip_hold)."""
        with self._offered_lock:
            return self._offered.get(session.id, 0)

    def all_offered(self, session):
        """A session this publisher never carried (read back after a
        restart): nothing of it waits for the publisher."""
        self._mark_offered(session.id, session.last_id)

    def forgotten(self, session):
        with self._offered_lock:
            self._offered.pop(session.id, None)

    def _mark_offered(self, session_id, event_id):
        with self._offered_lock:
            self._offered[session_id] = max(self._offered.get(session_id, 0), event_id)

    def event(self, session, event):
        """Every event of every run, and the runs list's, its own way too."""
        self.queue_event(session, event,
                         GRIP_RUNS_CHANNEL if session.id == RUNS_FEED_ID else None)

    def queue_event(self, session, event, bare_channel=None):
        """Queue the event's item (and, after the terminal one, a close), as
        (session, event id, item): once it is sent, it counts as offered.
        With `bare_channel`, also one there without its id (_without_id),
        which Pushpin passes on unchecked: the runs list on pages' streams."""
        # Event 1's prev-id is 0, the one a join before any event holds with.
        item = {"channel": session.id, "id": str(event.id), "prev-id": str(event.id - 1),
                "formats": {"http-stream": {"content": event.sse.decode()}}}
        items = [item]
        if bare_channel:
            items.append({"channel": bare_channel, "formats": {
                "http-stream": {"content": _without_id(event.sse).decode()}}})
        if event.terminal:    # the close is in the id sequence too, or Pushpin sees a gap
            items.append({"channel": session.id, "id": "%d-close" % event.id,
                          "prev-id": str(event.id),
                          "formats": {"http-stream": {"action": "close"}}})
        for item in items:
            try:
                self._queue.put_nowait((session, event.id, item))
            except queue.Full:
                self._count_failure(1, "queue full")
                self._mark_offered(session.id, event.id)   # never sent, no longer waited for

    def stats(self):
        return {"queued": self._queue.qsize(), "published": self.published,
                "failed": self.failed}

    def stop(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(GRIP_TIMEOUT_S)

    def _run(self):
        sent_at = 0.0
        while True:
            first = self._queue.get()
            if first is None:
                return
            time.sleep(max(0.0, sent_at + GRIP_INTERVAL_S - time.monotonic()))
            entries, stopping = self._take_queued(first)
            sent_at = time.monotonic()
            items = _merge_items([item for _, _, item in entries])
            for start in range(0, len(items), GRIP_BATCH):
                self._send(items[start:start + GRIP_BATCH])
            for session, event_id, _ in entries:   # whether Pushpin took them or not
                self._mark_offered(session.id, event_id)
            if stopping:
                return

    def _take_queued(self, first):
        """The first entry and all that are queued behind it (bounded by the
        queue's size), and whether stop() was called."""
        entries = [first]
        for _ in range(GRIP_QUEUE_LIMIT):
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                return entries, True
            entries.append(entry)
        return entries, False

    def _send(self, items):
        body = _json_line({"items": items}).encode()
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(*self._address, timeout=GRIP_TIMEOUT_S)
            self._conn.request("POST", self._path, body, {"Content-Type": "application/json"})
            response = self._conn.getresponse()
            response.read()
            if response.status != 200:
                raise OSError("Pushpin answered %d" % response.status)
        except Exception as exc:
            if not isinstance(exc, (OSError, http.client.HTTPException)):
                self._supervisor.survived("grip publisher")
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._count_failure(len(items), exc)
            return
        self.published += len(items)
        if self._failing:
            log.warning("GRIP publishing works again")
            self._failing = False

    def _count_failure(self, count, reason):
        self.failed += count
        if not self._failing:
            self._failing = True
            log.warning("GRIP publishing failed (%s); clients will resume from history", reason)


def _grip_hold(session, last_id, offered_id, grip_last, keepalive_s, link_query=None,
               path=None, runs=False):
    """The answer to a stream request that came through Pushpin: (body,
    headers). The body is the history the client is missing, up to the last
    event offered to Pushpin; the headers tell Pushpin to hold the stream on
    the session's channel from there, so no thread of ours waits on it.
    Pushpin asks again with Grip-Last to recover a gap, and the answer is
    appended to the stream. A run whose terminal event was offered is
    answered whole, without a hold, so the stream ends. Pushpin's own
    requests carry none of the client's headers: behind a token, the link
    carries a key in its query (`link_query`: the run's view key, which
    reaches that run only), and Pushpin keeps Grip-* headers to itself.
    With `runs`, the hold takes the runs list's changes too, without ids
    (GRIP_RUNS_CHANNEL; PROTOCOL.md, "A page's stream")."""
    recovering = re.search(r"last-id=([0-9]+)", grip_last or "")
    if recovering:
        last_id = int(recovering.group(1))
    # `offered_id` (the publisher's, read first) is the last event Pushpin
    # has been given: every event up to it is in the history. Stopping there
    # (not at the newest event, which may still wait for the publisher) the
    # hold's prev-id is one Pushpin has seen or will see next, so a join
    # does not look like a gap, and the events after it arrive as items.
    ended = session.terminal_id is not None and session.terminal_id <= offered_id
    events = [e for e in session.events_after(last_id or 0, HISTORY_LIMIT) if e.id <= offered_id]
    body = (b"" if recovering else RETRY) + b"".join(e.sse for e in events)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if not ended:
        # Reliable mode: with the channel's prev-id and a recovery link,
        # Pushpin notices an event published before it subscribed (or lost
        # on the way) and asks this same URL again.
        # With no event yet, 0: the prev-id event 1's item carries.
        prev_id = events[-1].id if events else (last_id or 0)
        headers["Grip-Hold"] = "stream"
        headers["Grip-Channel"] = "%s; prev-id=%d" % (session.id, prev_id) + (
            ", " + GRIP_RUNS_CHANNEL if runs else "")
        headers["Grip-Link"] = "<%s%s>; rel=next; timeout=%d" % (
            path or "/progress/" + session.id, "?" + link_query if link_query else "",
            GRIP_LINK_TIMEOUT_S)
        headers["Grip-Keep-Alive"] = "%s; format=cstring; timeout=%d" % (
            KEEPALIVE.decode().replace("\n", "\\n"), max(1, round(keepalive_s)))
    return body, headers


def _grip_signature_valid(token, key):
    """Check Pushpin's Grip-Sig: a JWT signed with HS256 that has not expired.
    Its claims are read only once the signature holds: before, they are
    anyone's."""
    try:
        if not token:
            return False
        header, claims, signature = token.split(".")
        expected = hmac.new(key.encode(), (header + "." + claims).encode(),
                            hashlib.sha256).digest()
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        if not hmac.compare_digest(expected, given):
            return False
        data = _json_value(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        return float(data.get("exp", 0)) > time.time()
    except (ValueError, TypeError, AttributeError):
        return False


###############################################################################
# The job: a plain function, and the thread that runs it
###############################################################################

class BadParam(ValueError):
    """A /start parameter the job cannot take: the job layer's own error,
    which the HTTP handler answers as 400 naming `param`."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


class Cancelled(SystemExit):
    """Raised by `progress(...)` after POST /cancel, to unwind the job.

    Not an Exception, like asyncio.CancelledError, so that a job's own
    `except Exception:` does not swallow it; a SystemExit with status 3, so
    that a script whose `Reporter` block it leaves ends there, quietly, with
    the status `watch` and `report` give a cancelled run."""

    def __init__(self):
        super().__init__(3)


def describe_job(title=None, params=None, fields=None):
    """Declare what a job is, for the page, for GET /job and for /start::

        @describe_job(title="Optimise the build",
                      params={"generations": {"min": 1, "max": 500, "help": "rounds"}},
                      fields={"best_score": {"label": "Best score", "unit": "pts"}})
        def optimize_build(progress, generations=30): ...

    `params` adds bounds (`min`, `max`, and `at_most`: the name of another
    parameter whose value bounds this one) and `help` to the parameters the
    signature already has; `fields` gives the progress fields a label and a
    unit. Everything is optional. It only stores a plain dict as the
    function's `sse_job` attribute, so a job module that should not import
    sse_demo can set that attribute itself.
    """
    def declare(func):
        func.sse_job = {"title": title, "params": params or {}, "fields": fields or {}}
        return func
    return declare


@describe_job(
    title="Build optimisation (simulated)",
    params={
        "iterations": {"min": 1, "max": 10000000, "help": "steps of the simulated search"},
        "tick": {"min": 0.0, "max": 60.0, "help": "seconds of simulated work per step"},
        "update_every": {"min": 1, "max": 10000000, "at_most": "iterations",
                         "help": "send a progress event every this many steps"},
    },
    fields={"improvement_pct": {"label": "Improvement", "unit": "%"},
            "dps": {"label": "DPS"}})
def simulate_optimisation(progress, iterations=600, tick=0.1, update_every=100, cancel=None):
    """A stand-in for a long optimisation: the improvement it finds grows
    with diminishing returns, and DPS (damage per second) follows it.

    Each step is due `tick` seconds after the previous one was due, so late
    wake-ups on a busy machine do not add up: the run ends `iterations x
    tick` seconds after it started.
    """
    cancel = cancel or threading.Event()
    rng = random.Random()     # its own: an application's seeded `random` stays its own
    base_dps = rng.uniform(9000.0, 11000.0)
    ceiling = rng.uniform(18.0, 32.0)
    improvement = 0.0
    started = time.monotonic()
    for i in range(iterations):
        if i % update_every == 0:
            dps = base_dps * (1 + improvement / 100) * rng.uniform(0.995, 1.005)
            progress(i, iterations, improvement_pct=round(improvement, 2), dps=round(dps, 1))
        if cancel.wait(max(0.0, started + (i + 1) * tick - time.monotonic())):
            return None
        found = ceiling * (1 - math.exp(-4.0 * (i + 1) / iterations))
        improvement = max(improvement, found * rng.uniform(0.97, 1.0))
    return None


def _is_finite_number(value):
    """An int or a float (not a bool) that a float can hold, not NaN or
    infinite: what arithmetic on a count may take (an integer past a
    float's range makes OverflowError there)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_number(name, value):
    if not _is_finite_number(value):
        raise TypeError("progress() %s must be a finite number, not %r" % (name, value))


class Bar:
    """A nested bar, from `progress.bar(label, total)`: calling it,
    `bar(done, **fields)`, moves it and publishes the run's progress with
    every level in `bars`; `bar.bar(...)` nests one more level. A new
    position of an outer level ends the levels inside it (see
    Progress._end_inside)."""

    def __init__(self, progress, depth, label, total):
        if total is not None:
            _check_number("total", total)
        self._progress, self._depth = progress, depth
        levels = progress._levels[:depth] or [[progress._stage, 0, None]]
        progress._levels = levels + [[str(label), 0, total]]

    def __call__(self, done, **fields):
        progress = self._progress
        progress._check_cancel()
        _check_number("done", done)
        if len(progress._levels) <= self._depth:      # an outer level moved on since
            raise RuntimeError("this bar has ended: its outer level moved on")
        progress._levels[self._depth][1] = done
        progress._end_inside(self._depth)
        progress._publish(fields)

    def bar(self, label, total=None):
        """A bar nested inside this one (the batches of an epoch)."""
        return Bar(self._progress, self._depth + 1, label, total)


def _whole_run(levels):
    """iteration, total and percent of the whole run from nested levels
    [label, done, total], outermost first: each level's position plus the
    fraction of the level inside it (epoch k of N, its inner bar at f:
    (k - 1 + f) / N), so the percent never goes back when an inner bar
    restarts; like a plain progress(), a percent within 0 to 100, and none
    without a positive total. With the inner levels' totals known (and
    positive), iteration counts innermost steps (albums done times photos
    an album, plus this album's photos), and the total is their product,
    or null while the outermost total is unknown; past a float's range
    (10**200 batches of 10**200 steps, or 1e-300 of 1e-300), or with an
    outermost total at or below 0, the outermost level's own count."""
    fraction = 0.0
    for _, done, total in reversed(levels):
        fraction = min(1.0, max(0.0, (done + fraction) / total)) if total and total > 0 else 0.0
    outer_done, outer_total = levels[0][1], levels[0][2]
    data = {"iteration": outer_done, "total": outer_total}
    if (outer_total is None or outer_total > 0) and \
            all(total and total > 0 for _, _, total in levels[1:]):
        iteration, size = 0, 1
        for _, done, total in reversed(levels[1:]):
            iteration += min(done, total) * size
            size *= total
        iteration += (outer_done if outer_total is None else min(outer_done, outer_total)) * size
        whole = None if outer_total is None else outer_total * size
        if _is_finite_number(iteration) and (whole is None or _is_finite_number(whole) and whole > 0):
            data["iteration"], data["total"] = iteration, whole
    if outer_total and outer_total > 0:
        data["percent"] = _hundredths(100.0 * fraction)
    return data


def _progress_data(done, total=None, stage=None, bars=None, fields=None):
    """A progress event's data. `bars`, in place of `done` and `total`:
    [label, done, total] levels, outermost first."""
    if bars is None:
        data = {"iteration": done, "total": total}
        if total and total > 0:           # 150 of 100 is 100 %, -5 of -10 no percent
            data["percent"] = _hundredths(100.0 * min(max(done / total, 0.0), 1.0))
    else:
        data = _whole_run(bars)
        data["bars"] = [{"label": label or "", "done": d, "total": t} for label, d, t in bars]
    if stage:
        data["stage"] = stage
    if fields:
        data.update(fields)
    return data


def _log_data(message, level, **extra):
    """A log event's data; a message over LOG_MESSAGE_LIMIT characters is cut."""
    text = str(message)
    if len(text) > LOG_MESSAGE_LIMIT:
        text = text[:LOG_MESSAGE_LIMIT] + " [cut: %d characters in all]" % len(text)
    data = {"message": text, "level": level}
    data.update(extra)
    return data


def _check_fields(fields):
    if not RESERVED_FIELDS.isdisjoint(fields):
        clash = sorted(RESERVED_FIELDS.intersection(fields))[0]
        raise TypeError("progress() field %r is reserved" % clash)


class Progress:
    """The `progress(done, total=None, stage=None, **fields)` callback handed
    to a job, with `progress.log(message, level="info")` for a line of text
    and `progress.bar(label, total)` for a nested bar (see `Bar`)."""

    def __init__(self, session):
        self._session = session
        self._levels = []          # [label, done, total] per nested level, outermost first
        self._ended = {}           # depth -> (its total, the levels inside it at 0): _end_inside
        self._stage = None

    def __call__(self, done, total=None, stage=None, **fields):
        self._check_cancel()
        _check_number("done", done)
        if total is not None:
            _check_number("total", total)
        if stage is not None:
            self._stage = str(stage)
        if len(self._levels) > 1 or self._ended:     # nested bars, now or before
            self._end_inside(0)                      # (before level 0 is replaced)
        self._levels = [[self._stage, done, total]]
        _check_fields(fields)
        levels = self._shown() if self._ended else self._levels
        if len(levels) > 1:
            self._report(None, stage=self._stage, bars=levels, fields=fields)
        else:
            self._report(done, total, self._stage, fields=fields)

    def bar(self, label, total=None):
        """A bar nested inside the current position (batches inside an
        epoch): the run's percent then counts its fraction too."""
        return Bar(self, 1, label, total)

    def _end_inside(self, depth):
        """A new position at `depth` ends the levels inside it (the batches of
        an epoch, at the next epoch). They count as restarted, at 0 with
        their totals, while the level at `depth` keeps the total it had, so
        that the run keeps its unit, the innermost step: epoch 2 of 10
        starts at batch 50 of 500, not at 1 of 10. A position with another
        total (a known one after none, too) is a phase of its own, counted
        in its own steps."""
        shown = self._shown()
        if len(shown) > depth + 1:
            self._ended[depth] = (shown[depth][2],
                                  [[label, 0, total] for label, _, total in shown[depth + 1:]])
        del self._levels[depth + 1:]

    def _shown(self):
        """The levels an event reports: the live ones, then the ended ones
        inside the innermost while it keeps their total (_end_inside)."""
        levels = self._levels
        ended = self._ended.get(len(levels) - 1)
        if ended is not None and ended[0] == levels[-1][2]:     # (None, None: the same)
            return levels + ended[1]
        return levels

    def _report(self, done, total=None, stage=None, bars=None, fields=None):
        """Publish a progress event, even after Cancel: a command's output
        stays progress while it stops."""
        self._session.publish("progress", _progress_data(done, total, stage, bars, fields))

    def _publish(self, fields):
        """A nested bar moved: publish every level (two or more)."""
        _check_fields(fields)
        self._report(None, stage=self._stage, bars=self._shown(), fields=fields)

    def _check_cancel(self):
        if self._session.cancel.is_set():
            raise Cancelled()

    def log(self, message, level="info", **extra):
        """Publish a `log` event: a line the page shows as it is. Never
        blocks; a message over LOG_MESSAGE_LIMIT characters is cut."""
        if level not in LOG_LEVELS:
            raise ValueError("log level must be one of %s, not %r" % (", ".join(LOG_LEVELS), level))
        self._session.publish("log", _log_data(message, level, **extra))


def _run_job(session, job, params, pass_cancel):
    """The worker thread's body: run the job and turn how it ended (returned,
    cancelled, raised) into exactly one terminal event."""
    kwargs = dict(params)
    if pass_cancel:
        kwargs["cancel"] = session.cancel
    try:
        result = job(Progress(session), **kwargs)
    except Cancelled:
        _end_run(session, "cancelled", {})
    except BaseException as exc:   # a thread has no one to re-raise to
        log.error("job in session %s failed", session.id, exc_info=True)
        _end_run(session, "error", {"message": _describe_exception(exc)})
    else:
        if session.cancel.is_set():
            _end_run(session, "cancelled", {})
        else:
            _end_run(session, "complete", {} if result is None else {"result": result})


PARAM_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
PARAM_RULES = ("min", "max", "at_most", "help")


class _Param:
    """One /start parameter: its type (that of its default), its bounds and
    its help text. `at_most` names another parameter whose value bounds it."""

    __slots__ = ("name", "kind", "default", "min", "max", "at_most", "help")

    def __init__(self, name, default, min=None, max=None, at_most=None, help=None):
        self.name, self.kind, self.default = name, type(default), default
        self.min, self.max, self.at_most, self.help = min, max, at_most, help

    def describe(self):
        """The parameter as GET /job lists it."""
        data = {"name": self.name, "type": PARAM_TYPES[self.kind], "default": self.default}
        for rule in PARAM_RULES:
            if getattr(self, rule) is not None:
                data[rule] = getattr(self, rule)
        return data

    def highest(self, params):
        """The upper bound for these parameter values, or None."""
        bounds = [b for b in (self.max, params.get(self.at_most)) if b is not None]
        return min(bounds) if bounds else None

    def rule_text(self, params=None):
        """What a valid value is, for a 400's message: "an integer from 1 to 5"."""
        name = PARAM_TYPES[self.kind]
        text = ("an " if name[0] in "aeiou" else "a ") + name
        if self.min is not None:
            text += " from %s" % self.min
        if self.max is not None:
            text += " to %s" % self.max
        if self.at_most is not None:
            text += " and at most %s" % self.at_most
            if params is not None:
                text += " (%s)" % params[self.at_most]
        return text


class JobSpec:
    """What the server runs: a title, a description, the parameters /start
    accepts, the progress fields it declares, and how to start one run.
    GET /job, /start's validation and the page all read this one object."""

    publishes_its_start = False   # the built-in job's first event is its own iteration 0
    stop_grace_s = WORKER_STOP_GRACE_S   # how long a run stopped at shutdown may take to end

    def __init__(self, name, title, description, params, fields, run, check=None):
        self.name = name
        self.title = title
        self.description = description
        self.params = params      # {name: Param}, in the order the job gives them
        self.fields = fields      # [{"name", "label", "unit"?}]
        self._run = run           # run(session, params), in the run's worker thread
        self.check = check or (lambda params: None)   # raises BadParam for bad values

    def describe(self):
        """What GET /job answers."""
        return {"name": self.name, "title": self.title, "description": self.description,
                "params": [p.describe() for p in self.params.values()], "fields": self.fields}

    def stop_all(self):
        """Kill what runs may have left (a command's programs), at shutdown."""

    def kill_now(self):
        """The same, from a signal handler."""
        self.stop_all()

    def start(self, session, params, first=None):
        """Run the job for `session` in a thread of its own; returns the
        thread. That thread calls `first` before the job, if given (a run
        that leaves the queue waits there for the journal's disk)."""
        thread = threading.Thread(target=self._run_to_its_end, args=(session, params, first),
                                  name="job-" + session.id[:8], daemon=True)
        thread.start()
        return thread

    def _run_to_its_end(self, session, params, first=None):
        """The run's thread: its first event is progress at iteration 0, so
        that a client sees at once that the run is live; then whatever
        `run` does (a user's JobSpec may raise, or return without a terminal
        event), the run ends, with a message that says why, and frees its
        slot in the queue."""
        try:
            if first is not None:
                first()
            if not self.publishes_its_start:
                session.publish("progress", {"iteration": 0, "total": None})
            self._run(session, params)
        except BaseException as exc:   # a thread has no one to re-raise to
            log.error("run %s failed", session.id, exc_info=True)
            _end_run(session, "error", {"message": "the run failed: %s"
                                        % _describe_exception(exc)})
        else:
            if session.terminal_id is None:
                log.error("run %s: the job returned without ending the run", session.id)
                _end_run(session, "error", {"message": "the job stopped without saying "
                                            "how the run ended"})


def _declared_rules(name, default, declared):
    """A parameter's bounds and help from a declaration, checked."""
    rules = (declared.get("params") or {}).get(name) or {}
    if not isinstance(rules, dict) or not set(rules) <= set(PARAM_RULES):
        raise TypeError("parameter %r: declare it as a dict of %s" % (name, ", ".join(PARAM_RULES)))
    for bound in ("min", "max"):
        value = rules.get(bound)
        if value is not None and (type(default) not in (int, float) or
                                  type(value) not in (int, float)):
            raise TypeError("parameter %r: %s needs a numeric parameter and a number"
                            % (name, bound))
    return rules


def _readable(name):
    """`best_score` -> "Best score"."""
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _declared_fields(fields):
    """The declared progress fields as GET /job lists them."""
    listed = []
    for name, info in fields.items():
        if name in RESERVED_FIELDS or not isinstance(info, dict) or \
                not set(info) <= {"label", "unit"}:
            raise TypeError("field %r: declare it as a dict of label, unit "
                            "(and not as a reserved name)" % name)
        entry = {"name": name, "label": info.get("label") or _readable(name)}
        if info.get("unit"):
            entry["unit"] = info["unit"]
        listed.append(entry)
    return listed


def _signature_params(func):
    """Read a job's signature: {name: default} for the keyword parameters with
    a default of type bool, int, float or str, and whether it takes `cancel`.
    Raises TypeError for a signature the server cannot call."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        raise TypeError("cannot read the signature of %r" % (func,))
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional + (inspect.Parameter.VAR_POSITIONAL,):
        raise TypeError("a job's first parameter must receive `progress`")
    if type(parameters[0].default) in PARAM_TYPES:    # `def job(n=3)`: every run failed
        raise TypeError("a job's first parameter receives `progress`; %r=%r looks like a "
                        "parameter of its own: add `progress` before it"
                        % (parameters[0].name, parameters[0].default))
    params, pass_cancel = {}, False
    for p in parameters[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.name == "cancel":
            pass_cancel = True
        elif p.default is inspect.Parameter.empty:
            raise TypeError("job parameter %r needs a default" % p.name)
        elif type(p.default) in PARAM_TYPES:
            params[p.name] = p.default
    return params, pass_cancel


def function_job(func):
    """A JobSpec for a job function: its parameters from its signature, its
    title, bounds, help and fields from its `describe_job` declaration.
    Raises TypeError, naming the problem, for a job the server cannot run."""
    defaults, pass_cancel = _signature_params(func)
    declared = getattr(func, "sse_job", None) or {}
    if not isinstance(declared, dict) or not set(declared) <= {"title", "description",
                                                               "params", "fields"}:
        raise TypeError("sse_job must be a dict with title, description, params, fields")
    undeclared = sorted(set(declared.get("params") or {}) - set(defaults))
    if undeclared:
        raise TypeError("declared parameter %r is not in the job's signature" % undeclared[0])
    params = {name: _Param(name, default, **_declared_rules(name, default, declared))
              for name, default in defaults.items()}
    for name, param in params.items():
        if param.at_most is not None and (param.at_most not in params or
                                          params[param.at_most].kind not in (int, float)):
            raise TypeError("parameter %r: at_most must name a numeric parameter" % name)
    name = getattr(func, "__name__", None) or type(func).__name__
    doc = inspect.cleandoc(getattr(func, "__doc__", None) or "")
    spec = JobSpec(name, declared.get("title") or _readable(name),
                   declared.get("description") or " ".join(doc.split("\n\n")[0].split()),
                   params, _declared_fields(declared.get("fields") or {}),
                   lambda session, values: _run_job(session, func, values, pass_cancel))
    spec.publishes_its_start = func is simulate_optimisation
    return spec


BUILTIN_JOB = function_job(simulate_optimisation)


###############################################################################
# Any program as the job: --cmd
###############################################################################

PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
OUTPUT_LINE_LIMIT = 64 * 1024      # bytes of one output line; the rest is cut, with a note
OUTPUT_BURST_LINES = 200           # output lines a run may send as separate events at once,
OUTPUT_LINES_PER_S = 200           # and the rate that allowance refills at; past it, the
                                   # lines of one read are joined into one event, so that a
                                   # flood stays well inside the history (HISTORY_LIMIT)
OUTPUT_READ_BYTES = 65536          # one read of a program's output
OUTPUT_FLOOD_PAUSE_S = 0.01        # past the allowance, a pause after each read
STDERR_TAIL_LINES = 10             # stderr lines an `error` event quotes
DEFAULT_KILL_AFTER_S = 5.0         # Cancel: SIGTERM to the process group, SIGKILL after this
KILL_AFTER_MOST_S = 3600            # --kill-after's bound: an hour to save a checkpoint
COMMAND_POLL_S = 0.05              # how often a command's worker checks exit and cancel


def _typed_default(text):
    """A placeholder default as the value it looks like."""
    if text in ("true", "false"):
        return text == "true"
    if INTEGER_TEXT.fullmatch(text):
        return int(text)
    if NUMBER_TEXT.fullmatch(text):
        return float(text)
    return text


def _parse_command(template):
    """Split a --cmd template like a shell would (never run by one) and read
    its `{name=default}` placeholders: (argv template, {name: default}). Each
    default's type (int, float, bool, str) is that of its text. `{{` and `}}`
    are literal braces. Raises ValueError with the reason."""
    try:
        argv = shlex.split(template)
    except ValueError as exc:
        raise ValueError("--cmd cannot be split: %s" % exc)
    if not argv:
        raise ValueError("--cmd is empty")
    defaults = {}
    for arg in argv:
        for match in PLACEHOLDER.finditer(arg):
            text = match.group(0)
            if text in ("{{", "}}"):
                continue
            name, equals, default = (match.group(1) or "").partition("=")
            if match.group(1) is None or not equals or not default or "=" in default or \
                    not PLACEHOLDER_NAME.fullmatch(name):
                raise ValueError("bad placeholder %r in --cmd: write {name=default} "
                                 "(and {{ or }} for a literal brace)" % text)
            value = _typed_default(default)
            if name in defaults and repr(defaults[name]) != repr(value):   # 1 is not 1.0
                raise ValueError("placeholder %r has two defaults in --cmd" % name)
            defaults[name] = value
    if PLACEHOLDER.search(argv[0]):
        raise ValueError("the program itself cannot be a placeholder in --cmd")
    return argv, defaults


def _fill_command(argv, params):
    """The argv of one run: each placeholder replaced inside its own argument,
    so a value can never add an argument or reach a shell. An argument the
    template does not start with `-` cannot start with one once filled (the
    program would read it as an option): checked on the argument as it will
    be passed, so neither `{a=x}{b=y}` with `a` empty nor a number (`-5`)
    slips past."""
    filled = []
    for arg in argv:
        given = []      # (name, text) of each placeholder in the argument, in order

        def replacement(match):
            text = match.group(0)
            if text in ("{{", "}}"):
                return text[0]
            name = match.group(1).partition("=")[0]
            value = params[name]
            if "\0" in str(value):
                raise BadParam(name, "%s cannot hold a NUL character" % name)
            given.append((name, json.dumps(value) if isinstance(value, bool) else str(value)))
            return given[-1][1]
        filled.append(PLACEHOLDER.sub(replacement, arg))
        if filled[-1].startswith("-") and not arg.startswith("-"):
            name = next(name for name, text in given if text)
            raise BadParam(name, "%s cannot start with '-' here: the program would read it "
                                 "as an option" % name)
    return filled


SCRIPT_RUNNERS = re.compile(r"(ba|da|z|k|mk|a|c|tc|fi)?sh|python[0-9.]*|pypy[0-9.]*|script")


def _dash_c_script(argv):
    """The script that a shell, Python or util-linux's `script` runs with
    -c, as the template has it, or None. Reads the options before it as
    `bash -euo pipefail -c` and `script -qefc` have them."""
    if not SCRIPT_RUNNERS.fullmatch(os.path.basename(argv[0])):
        return None
    args = iter(argv[1:])
    for arg in args:
        if not re.fullmatch(r"[-+][A-Za-z]+", arg):
            return None                   # a script file (or --): no -c
        if arg[-1] in "oOW":
            next(args, None)              # its argument: -o pipefail, -W error
        elif arg[0] == "-" and "c" in arg:
            return next(args, "")
    return None


def _script_placeholder(argv):
    """The first placeholder inside the script that the template's shell (or
    Python) runs with -c, or None: there a value is code that runs, not data."""
    names = [m.group(1).partition("=")[0]
             for m in PLACEHOLDER.finditer(_dash_c_script(argv) or "") if m.group(1)]
    return names[0] if names else None


INTERPRETERS = re.compile(r"(python[0-9.]*|pypy[0-9.]*|node|deno|bun|ruby|perl|php|Rscript|"
                          r"julia|bash|sh|zsh|dash|uv|poetry|pipenv|conda)(\.exe)?")


# Words that open or close a shell's compound command where a command
# would start: a line with one is a loop, a test or a group, which no one of
# its commands names. And what separates commands: lists, then pipelines.
SHELL_COMPOUND = frozenset(("for", "while", "until", "if", "case", "select", "do", "done",
                            "then", "else", "elif", "fi", "esac", "function", "(", ")"))
SHELL_LIST_SEPARATORS = frozenset((";", ";;", "&&", "||", "&"))
SHELL_PIPES = frozenset(("|", "|&"))
SHELL_WRAPPERS = frozenset(("exec", "env", "time", "command", "nohup"))   # the command follows


def _shell_commands(line):
    """The line's commands as a shell splits them: a list of pipelines, each
    a list of commands (lists of words, quotes removed, `#` comments gone).
    None when it cannot be split (an open quote)."""
    lexer = shlex.shlex(line.replace("\n", ";"), posix=True, punctuation_chars=True)
    # Words end at spaces only (g++ is one), and operators still split off:
    # CPython 3.7's shlex cannot do both, and ends words at other characters.
    lexer.whitespace_split = sys.version_info >= (3, 8)
    pipelines = [[[]]]
    try:
        for word in lexer:
            if word in SHELL_LIST_SEPARATORS:
                pipelines.append([[]])
            elif word in SHELL_PIPES:
                pipelines[-1].append([])
            else:
                pipelines[-1][-1].append(word)
    except ValueError:
        return None
    return pipelines


def _last_command(line):
    """The words of the command that a shell's command line runs last
    (`stty cols 120; python3 train.py`: python3 train.py; of a pipeline, its
    first), without its variables and `exec` or `env`; [] when there is
    none, and for a loop, a test, a group or a here-document (`for f in *;
    do gzip $f; done` is not named `done`, nor `gzip`: the shell's own name
    says more), or a command that is a variable (`"$@"`)."""
    pipelines = _shell_commands(line)
    if pipelines is None:
        return []
    commands = [command for pipeline in pipelines for command in pipeline if command]
    if any(command[0] in SHELL_COMPOUND or command[0].startswith(("{", "}")) or "<<" in command
           for command in commands):           # ({{ is a template's brace)
        return []
    last = [pipeline for pipeline in pipelines if pipeline[0]][-1:]
    words = list(last[0][0]) if last else []
    while words and (re.match(r"\w+=", words[0]) or words[0] in SHELL_WRAPPERS
                     or words[0].startswith("-")):       # (env -i: a command never starts so)
        words.pop(0)
    if not words or words[0].startswith(("$", ">", "<", "&")):
        return []
    return words


def _program_name(argv):
    """What a command runs, as a person would name it: `python3 train.py`
    is train.py, `python -m pkg.train` is pkg.train, `make all` is make,
    `sh -c 'cd src && make'` and `script -qefc "python3 train.py"` what
    their command line runs last."""
    program = os.path.basename(argv[0].rstrip("/")) or argv[0]
    script = _dash_c_script(argv)
    if script is not None:                # Python's -c is code: named after Python
        words = [] if program.startswith(("python", "pypy")) else _last_command(script)
        named = _program_name(words) if words else ""
        return named if named.strip() else program      # (a word of control characters)
    if INTERPRETERS.fullmatch(program):
        args = iter(argv[1:])
        for arg in args:
            if arg == "-m":
                return next(args, program)
            if not arg.startswith("-") and not PLACEHOLDER.search(arg) and \
                    arg not in ("run", "exec"):
                return os.path.basename(arg.rstrip("/")) or arg
    return program


GUARD_EXIT_S = 2.0
GUARD_PROGRAM = """# sse_demo's process guard
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


HARD_KILL = getattr(signal, "SIGKILL", signal.SIGTERM)   # Windows has no SIGKILL
PROCESS_MARK = "SSE_DEMO_RUN_MARK"   # a random value in a program's environment (see
                                     # _end_leftover_group)


def _kill_group(pid, signum):
    """Signal a command and everything it started (its process group, POSIX);
    on Windows only the process itself can be reached (TerminateProcess)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(pid, signum)
        else:
            os.kill(pid, signal.SIGTERM)
    except OSError:
        pass    # gone already


class _CommandGroups:
    """The process groups of running commands, so that shutdown (even a
    second Ctrl-C) can kill whatever is left, and a guard process that
    kills them when the server dies without a shutdown (`kill -9`, a crash):
    it reads "+PGID" and "-PGID" lines on a pipe from the server, and the
    end of that pipe, which the kernel closes with the server, is its signal.
    POSIX only; on Windows a program outlives a crashed server."""

    def __init__(self):
        self._lock = threading.Lock()    # guards _groups, _guard
        self._groups = set()
        self._guard = None

    def add(self, pid):
        with self._lock:
            self._groups.add(pid)
            self._tell_guard("+%d\n" % pid)

    def discard(self, pid):
        with self._lock:
            self._groups.discard(pid)
            self._tell_guard("-%d\n" % pid)

    def kill_all(self):
        """SIGKILL every group. Takes no lock: a signal handler calls it."""
        for pid in list(self._groups):
            _kill_group(pid, HARD_KILL)

    def close(self):
        """Shutdown: kill what is left, then let the guard go."""
        self.kill_all()
        guard, self._guard = self._guard, None
        if guard is not None:
            try:
                guard.stdin.close()
                guard.wait(GUARD_EXIT_S)
            except (OSError, subprocess.TimeoutExpired):
                guard.kill()
                guard.wait()

    def _tell_guard(self, line):
        if not hasattr(os, "killpg") or not sys.executable:
            return
        try:
            if self._guard is None:
                # A session of its own: a Ctrl-C in the server's terminal
                # does not reach it, so it outlives the server to do its job.
                self._guard = subprocess.Popen(
                    [sys.executable, "-c", GUARD_PROGRAM], stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self._guard.stdin.write(line.encode())
            self._guard.stdin.flush()
        except OSError as exc:
            log.warning("the process guard is not running (%s): a program may outlive "
                        "a crash of the server", exc)
            self._guard = None


def _process_identity(pid):
    """What tells this process from a later one with the same pid: its start
    time since boot and the boot's id (Linux); only the pid elsewhere."""
    identity = {"pid": pid}
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            identity["start"] = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/sys/kernel/random/boot_id") as f:
            identity["boot"] = f.read().strip()
    except (OSError, ValueError, IndexError):
        pass
    return identity


def _runs_in_group(pid, group):
    """Linux: is process `pid` in process group `group`, and not a zombie?"""
    try:
        with open("/proc/%s/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False        # gone meanwhile
    return fields[0] != b"Z" and int(fields[2]) == group


def _group_alive(process):
    """Whether anything of the command is still running: its process
    group (POSIX: a shell's children outlive the shell), or on Windows the
    program itself. A zombie is not running: on Linux the group's members
    are read from /proc, because an exited child of a dead parent waits
    for whoever adopted it to reap it, which in a container may be never,
    and signalling the group still reaches it."""
    if not hasattr(os, "killpg"):
        return process.poll() is None
    process.poll()          # reaps the leader once it has exited
    if os.path.isdir("/proc/self"):
        return any(_runs_in_group(pid, process.pid) for pid in os.listdir("/proc") if pid.isdigit())
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True         # (EPERM: it is there)
    return True


def _wait_or_cancel(process, cancel, kill_after_s):
    """Wait for the program to exit. On cancel, SIGTERM its group, give the
    whole group `kill_after_s` to exit (a shell dies at once and leaves the
    program it started: that one gets the time too), then SIGKILL what is
    left. (cancelled, forced): forced when something was still running at
    the deadline."""
    while True:
        try:
            process.wait(COMMAND_POLL_S)
            return cancel.is_set(), False   # it may have been killed since the flag was set
        except subprocess.TimeoutExpired:
            pass
        if cancel.is_set():
            break
    _kill_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + kill_after_s
    while _group_alive(process):
        left = deadline - time.monotonic()
        if left <= 0:
            _kill_group(process.pid, HARD_KILL)
            process.wait()
            return True, True
        time.sleep(min(COMMAND_POLL_S, left))
    process.wait()
    return True, False


def _kill_after_seconds(text):
    """--kill-after's value: seconds from 0 (SIGKILL at once) to an hour
    (nan and infinity never came: Cancel waited for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text)
    if not 0 <= value <= KILL_AFTER_MOST_S:
        raise argparse.ArgumentTypeError("must be from 0 to %d seconds, not %s"
                                         % (KILL_AFTER_MOST_S, text))
    return value


def _say_forced(session, command, kill_after_s, terminal=None):
    """A warning in the run's log: the program is killed, not stopped, so
    whatever it meant to do on SIGTERM (save a checkpoint) did not happen.
    `report` says it in its own terminal too (`terminal`: where the
    program's stderr is echoed), beside the program's last lines."""
    message = "%s did not stop within %g s of SIGTERM (--kill-after): killed with %s" % (
        _program_name(command), kill_after_s, getattr(HARD_KILL, "name", "SIGKILL"))
    session.publish("log", _log_data(message, "warning"))
    if terminal is not None:
        try:
            terminal.write(("\n%s\n" % message).encode("utf-8", "replace"))   # not after a bar
            terminal.flush()
        except (OSError, ValueError):     # a closed terminal: the event went all the same
            pass


def _exit_fields(program, status, stderr_tail):
    """The `error` event's data for a program that failed: its message, and
    its `exit_code` or the name of the `signal` that killed it."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "signal %d" % -status
        fields = {"message": "%s was killed by %s" % (program, name), "signal": name}
    else:
        fields = {"message": "%s exited with status %d" % (program, status), "exit_code": status}
    if stderr_tail:
        fields["message"] += "; the last lines of its stderr:\n" + "\n".join(stderr_tail)
    return fields


# What moves a terminal's cursor in a program's output: a \r returns to the
# line's start, so that what follows redraws it; a backspace goes one
# character back (Keras writes a run of them before its \r). tqdm draws a bar
# at `position` N with N newlines before it and N cursor-ups (ESC [ A) after
# it; rich returns and erases the line (\r ESC [ 2K) before each cursor-up.
CURSOR = re.compile("\r\n|\r?(?:\x1b\\[2K)?\x1b\\[([0-9]*)A|\r|\n|\x08+")
UNFINISHED_MOVE = re.compile("(?:\r|\x1b\\[2K|\x1b\\[?[0-9;?]*)+$")
# Other escapes: CSI (erase line, cursor on/off, colours), OSC (a title, a
# link) and DCS, APC, PM and SOS strings. A log line keeps SGR's colours.
OTHER_ESCAPES = re.compile("\x1b\\[[0-9;?]*[ -/]*[@-~]|\x1b[]P^_X][^\x07\x1b]*(?:\x07|\x1b\\\\)?")
LOG_ESCAPES = re.compile("\x1b\\[[0-9;?]*[ -/]*[@-ln-~]|\x1b[]P^_X][^\x07\x1b]*(?:\x07|\x1b\\\\)?")

TQDM_BAR = re.compile(
    r"(?:(?P<desc>.*?):)?\s*"
    r"(?:(?P<percent>\d{1,3})%\|[^|]*\|)?\s*"
    r"(?P<done>\d+(?:\.\d+)?[kMGTPEZY]?)"
    r"(?:/(?P<total>\d+(?:\.\d+)?[kMGTPEZY]?)|(?P<unit>[^\s\[\]/]*))"
    r"\s*(?:\[(?P<meta>[^\]]*)\]?)?\s*")
TQDM_CLOCK = re.compile(r"(?:\d+:)?\d+:\d\d")                  # 00:04, 1:02:03
TQDM_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<prefix>[kMGTPEZY]?)(?P<unit>[^/\s]*)"
                       r"/(?P<per>\S+)")

UNIT_PREFIXES = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                 "Z": 1e21, "Y": 1e24}
SCALED_UNITS = ("B", "b", "bit", "bits", "byte", "bytes", "it")   # units a prefix may scale
DURATION_PARTS = re.compile(r"(\d+(?:\.\d+)?) ?(ms|min|s|m|h)")


def _tqdm_rate(text):
    """tqdm's rate as (units per second, unit): "10.00it/s" -> (10.0, "it/s"),
    "2.50s/it" -> (0.4, "it/s"), "1.2MB/s" -> (1200000.0, "B/s"); None for
    "?it/s"."""
    match = TQDM_RATE.fullmatch(text)
    if match is None:
        return None
    number = float(match.group("number")) * UNIT_PREFIXES[match.group("prefix")]
    if match.group("unit") == "s" and match.group("per") != "s":
        return (round(1.0 / number, 6), match.group("per") + "/s") if number else None
    return number, (match.group("unit") or "it") + "/s"


def _unit_number(text):
    """`45` -> 45, `1.2k` -> 1200 (tqdm's unit_scale)."""
    prefix = text[-1] if text[-1] in UNIT_PREFIXES else ""
    number = float(text[:-1] if prefix else text) * UNIT_PREFIXES[prefix]
    return int(number) if number.is_integer() else number


def _seconds(text):
    """A clock or a duration as seconds: "1:02:03" 3723, "00:05" 5, "1m 5s"
    65, "40ms" 0.04; None for anything else ("?", "--:--")."""
    if ":" in text:
        seconds = 0
        for part in text.split(":"):
            if not part.isdigit():
                return None
            seconds = seconds * 60 + int(part)
        return seconds
    parts = DURATION_PARTS.findall(text)
    return sum(float(number) * {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}[unit]
               for number, unit in parts) if parts else None


def _parse_tqdm(text):
    """A tqdm bar, or None: {"desc", "done", "total", "rate", "unit", "eta",
    "fields"}.

    tqdm's shape, "desc: 45%|####5     | 45/100 [00:04<00:05, 10.00it/s,
    loss=0.1]" or without a total "45it [00:04, 10.00it/s]", is required:
    the percent and bar, or the bracket that starts with tqdm's clock. So
    "Tests passed: 45/50" stays a log line."""
    match = TQDM_BAR.fullmatch(text.strip())
    if match is None:
        return None
    meta = [part.strip() for part in (match.group("meta") or "").split(",")]
    if match.group("percent") is None and not TQDM_CLOCK.match(meta[0]):
        return None
    fields = {}
    for part in meta[2:]:
        name, equals, value = part.partition("=")
        if equals and PLACEHOLDER_NAME.fullmatch(name.strip()) and \
                name.strip() not in RESERVED_FIELDS and NUMBER_TEXT.fullmatch(value.strip()):
            number = float(value)
            fields[name.strip()] = int(number) if INTEGER_TEXT.fullmatch(value.strip()) else number
    total = match.group("total")
    rate = _tqdm_rate(meta[1] if len(meta) > 1 else "") or (None, None)
    return {"desc": (match.group("desc") or "").strip() or None,
            "done": _unit_number(match.group("done")),
            "total": _unit_number(total) if total else None,
            "rate": rate[0], "unit": rate[1], "eta": _seconds(meta[0].partition("<")[2]),
            "fields": fields, "nests": True}


# Other programs' progress lines, read by what they share (PROTOCOL.md,
# "--cmd"): a percent, an amount done of a total (`45/100`, `18MiB/57MiB`,
# `(7 of 200)`), a bar drawn in `#`, `=`, `━`, `█` or wget's dots, a rate
# (`20.0MB/s`, `40ms/step`), an ETA, and `name: value` or `name=value`
# numbers; the text before them names the task. One pattern finds them all,
# left to right; _parse_meter decides whether they add up to progress.
METER_NUMBER = r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
METER_SIZE = r"(?:[kKMGTPEZY]i?B|B|bytes?|[kKMGTPEZY])(?![A-Za-z])"
METER_DURATION = r"(?:\d+:\d\d(?::\d\d)?|(?:\d+h ?)?(?:\d+m(?:in)? ?)?\d+(?:\.\d+)? ?(?:ms|s)\b)"
METER = re.compile(
    # tokens that start with a word (each tried only where a word starts)
    r"(?=[A-Za-z_~])(?<!\w)(?:"
    r"(?P<elapsed>(?i:elapsed(?: time)?|in|spent)\b\s*:?\s*%(d)s)"
    r"|(?P<eta>(?:(?i:eta|left|remaining)\b\s*[:=]?\s*|~)(?P<eta_text>%(d)s))"
    r"|(?P<named_percent>(?P<percent_name>[A-Za-z_]\w*)=(?P<percent_value>\d+(?:\.\d+)?) ?%%)"
    r"|(?P<pair>(?P<name>[A-Za-z_]\w*) ?[:=] *(?P<value>[-+]?%(n)s(?:[eE][-+]?\d+)?)"
    r" ?(?P<value_unit>%(u)s)?(?![\w:/.%%])))"
    # tokens that start with a number
    r"|(?=\d)(?:"
    r"(?P<rate>(?P<rate_n>%(n)s) ?(?P<rate_unit>[A-Za-z]*)/s(?:ec)?\b)"
    r"|(?P<pace>(?P<pace_n>%(n)s) ?(?P<pace_unit>ms|s)/(?P<pace_per>[A-Za-z]+)\b)"
    r"|(?P<percent>(?<![\w.])(?P<percent_n>\d{1,3}(?:\.\d+)?) ?%%)"
    r"|(?P<count>(?<![=:/])(?P<done>%(n)s) ?(?P<done_unit>%(u)s)? ?/ ?(?P<total>%(n)s) ?"
    r"(?P<total_unit>%(u)s)?(?![\w/.-]))"
    r"|(?P<of>(?<!\w)(?P<of_done>\d+) of (?P<of_total>\d+)\b)"
    r"|(?P<duration>(?<![\w.])%(d)s)"
    r"|(?P<size>%(n)s ?%(u)s))"
    # a bar
    r"|(?P<bar>[\[|][#=>\-━╸╺█▉▊▋▌▍▎▏ ]{5,}[\]|]|[━╸╺█▉▊▋▌▍▎▏]{2,}|(?:\.{10} ?)+)"
    % {"n": METER_NUMBER, "u": METER_SIZE, "d": METER_DURATION})
# What may make a line ended by a newline progress at all: a read without
# any of METER_MARKS holds only log lines, taken in bulk (the fast path of
# _OutputScreen.feed), and a line without METER_HINT is not parsed.
METER_MARKS = ("%", "/", "━", "█", "..........")
METER_HINT = re.compile(r"\d ?%|\d ?/ ?\d|[━█]|\.{10}")
# curl's meter: columns under a two-line header, no unit but its own.
CURL_METER = re.compile(
    r"\s*(?P<percent>\d{1,3})\s+(?P<total>\S+)\s+\d{1,3}\s+(?P<done>\S+)\s+\d{1,3}\s+\S+\s+"
    r"\S+\s+\S+\s+[-:\d]+\s+[-:\d]+\s+(?P<left>[-:\d]+)\s+(?P<rate>\d\S*)")
# A count on a line of its own ("Epoch 3/10", Keras' heading before its bar)
# is a log line, and also the outer level of the bar that follows it.
HEADING = re.compile(r"\s*(?P<label>[A-Za-z][\w .-]*?):?\s*(?P<k>\d+)\s*/\s*(?P<n>\d+)\s*")


def _amount(number, unit):
    """A number as printed, with its size unit, in plain units: "1,234" 1234,
    "18" "MiB" 18874368, "2.5" "k" 2500."""
    value = float(number.replace(",", ""))
    power = "KMGTPEZY".find((unit or "B")[0].upper()) + 1
    if power:
        value *= (1024 if unit[1:2] == "i" else 1000) ** power
    return int(value) if value.is_integer() else value


def _meter_rate(number, unit):
    """A rate as (units per second, unit): "20.0" "MB" 2e7 B/s; a bare "/s" is it/s."""
    prefix = unit[:2] if unit[1:2] == "i" else unit[:1]
    if prefix and unit[len(prefix):] in SCALED_UNITS:
        return _amount(number, prefix + "B"), unit[len(prefix):] + "/s"
    return _amount(number, ""), (unit or "it") + "/s"


def _meter_count(token):
    """(done, total) of a `45/100`, `18MiB/57MiB` or `7 of 200`, or None for
    one that is not a count (more done than its total, `1.2/3.4` without a
    unit: a version, a date)."""
    if token.lastgroup == "of":
        done, total = int(token.group("of_done")), int(token.group("of_total"))
    else:
        unit = token.group("total_unit") or token.group("done_unit")
        if not unit and not (token.group("done") + token.group("total")).replace(",", "").isdigit():
            return None
        done = _amount(token.group("done"), token.group("done_unit") or unit)
        total = _amount(token.group("total"), unit)
    return (done, total) if 0 <= done <= total and total > 0 else None


def _pace(token):
    """"40ms/step" as (25.0, "step/s")."""
    seconds = float(token.group("pace_n")) * (0.001 if token.group("pace_unit") == "ms" else 1)
    return (round(1.0 / seconds, 6) if seconds else None), token.group("pace_per") + "/s"


def _curl_amount(text):
    """curl's "57.2M": its k, M and G are 1024's powers."""
    number, unit = re.match(r"([\d.]+)(\D?)$", text).groups()
    return round(_amount(number, unit and unit + "iB"))


def _parse_curl(match):
    """curl's meter row: % Total % Received % Xferd, speeds, times, current speed."""
    try:
        done, total, rate = (_curl_amount(match.group(name)) for name in ("done", "total", "rate"))
    except (AttributeError, ValueError):
        return None
    if total <= 0:
        return None
    return {"desc": None, "done": min(done, total), "total": total, "rate": rate,
            "unit": "B/s", "eta": _seconds(match.group("left")), "fields": {}}


def _meter_tokens(text):
    """What METER finds in a line, left to right: (where the first token
    starts, the percent, the count, the rate, the ETA, a duration, how many
    percents, a bar, bracketed, {name: value})."""
    first = percent = count = rate = eta = duration = None
    percents, bar, bracketed, fields = 0, False, False, {}
    for token in METER.finditer(text):
        kind = token.lastgroup
        if first is None:
            first = token.start()
        if kind == "elapsed":
            continue
        if kind == "percent":
            percents += 1
            percent = float(token.group("percent_n"))
            bracketed = bracketed or text[token.end():].lstrip().startswith("]")
        elif kind in ("count", "of") and count is None:
            count = _meter_count(token)
            bracketed = bracketed or (text[:token.start()].rstrip().endswith("[")
                                      and text[token.end():].lstrip().startswith("]"))
        elif kind == "bar":
            bar = True
        elif kind in ("rate", "pace") and rate is None:
            rate = _meter_rate(token.group("rate_n"), token.group("rate_unit")) \
                if kind == "rate" else _pace(token)
        elif kind == "eta" and eta is None:
            eta = _seconds(token.group("eta_text"))
        elif kind == "duration" and text[token.end():token.end() + 1] == "<":
            continue                              # [elapsed<left, rate] (tqdm's shape)
        elif kind == "duration" and duration is None and (percent, count) != (None, None):
            duration = _seconds(token.group(0))
        elif kind == "pair" and token.group("name") not in RESERVED_FIELDS:
            fields[token.group("name")] = _amount(token.group("value"), token.group("value_unit"))
        elif kind == "named_percent" and token.group("percent_name") not in RESERVED_FIELDS:
            fields[token.group("percent_name")] = _amount(token.group("percent_value"), "")
    return first, percent, count, rate, eta, duration, percents, bar, bracketed, fields


def _parse_meter(text, redrawn=False):
    """Another program's progress line, or None: the same dict as
    _parse_tqdm's. `redrawn`: the line is drawn in place (after a \\r),
    which alone makes a percent, or a rate with its amount, progress (dpkg's
    "Reading database ... 45%", dd's "... copied, 1 s, 499 MB/s").

    A percent (only one) counts with a bar, a rate, an ETA or brackets
    (pytest's "[ 45%]"); an amount of a total without a percent with a
    bar, a rate, an ETA or brackets ("[12/40] Building", "Step [3/20]"),
    or as a line's heading with fields of its own ("Epoch 3/10: loss=0.31
    acc=62%": a `record`, each one kept in the log). Either counts alone
    too: a line that is nothing but "3/50" or "45%" (the plainest progress
    a script prints). So a count or a percent in prose ("Tests passed:
    45/50 (90%)", "Coverage: 85%") and a JSON object stay log lines."""
    if "\x1b" in text:
        text = OTHER_ESCAPES.sub("", text)
    if text.lstrip().startswith("{") and text.rstrip().endswith("}"):
        return None           # a JSON log line's numbers are not a meter
    curl = CURL_METER.fullmatch(text)
    if curl:
        return _parse_curl(curl)
    first, percent, count, rate, eta, duration, percents, bar, bracketed, fields = \
        _meter_tokens(text)
    if percents > 1 or (percent or 0) > 100:
        return None
    evidence = bar or rate is not None or eta is not None or bracketed or (
        first is not None and METER.fullmatch(text.strip()) is not None)   # the token alone
    record = count and fields and percent is None and not evidence and HEADING.match(text)
    if percent is not None and (evidence or redrawn):
        done, total = count or (percent, 100)
    elif count and (evidence or record):
        done, total = count
    elif redrawn and (rate is not None or len(fields) > 1):
        number = METER.search(text)
        done, total = (list(fields.values()) or [0])[0], None
        if number and number.lastgroup == "size":
            done = _amount(*re.split(r" ?(?=[A-Za-z])", number.group(0), maxsplit=1))
    else:
        return None
    going = total is None or done < total
    desc = text[:first].strip(" \t:|[(-") if first and total else ""
    return {"desc": desc if any(c.isalpha() for c in desc) else None,
            "done": done, "total": total, "rate": (rate or (None, None))[0],
            "unit": (rate or (None, None))[1], "eta": eta if eta is not None else
            (duration if going else None), "fields": fields, "record": bool(record)}


def _parse_bar(text, redrawn=False):
    """A progress line of any program: tqdm's (read in full) or another's."""
    return _parse_tqdm(text) or _parse_meter(text, redrawn)


def _fraction(bar):
    return bar["done"] / bar["total"] if bar["total"] else 0.0


def _finished(bar):
    return bar["total"] is not None and bar["done"] >= bar["total"]


NO_STAGE = object()    # the stage of no run of progress lines


# ffmpeg's `-progress URL` (`-progress pipe:1`): a block of `key=value`
# lines, each write one block, ended by `progress=continue` (`end` at the
# last), every half second. One block is one progress event, never log lines.
# Only ffmpeg's keys with values of ffmpeg's shapes (a number, `N/A`, `0.95x`,
# `345.5kbits/s`, a time), in a block with an `out_time`, form one: any other
# line is the program's own (a log line).
KEY_VALUE_LINE = re.compile(
    r"\s*(frame|fps|stream_\d+_\d+_\w+|bitrate|total_size|out_time(?:_us|_ms)?|dup_frames"
    r"|drop_frames|speed|progress)=(.*)\Z")
KEY_VALUE_LINE_LIMIT = 120         # longer lines are no ffmpeg key=value line
FFMPEG_VALUE = re.compile(r"-?[0-9.]+(?:e[+-]?[0-9]+)?(?:x|kbits/s)?|N/A"   # %g: 1.23e+03x
                          r"|-?[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]+"
                          r"|continue|end")     # a time before the first frame: negative


def _key_value(line):
    """(key, value) of one of ffmpeg's -progress lines, or None."""
    match = KEY_VALUE_LINE.match(line) if len(line) <= KEY_VALUE_LINE_LIMIT else None
    if match is None:
        return None
    value = match.group(2).strip()
    return (match.group(1), value) if FFMPEG_VALUE.fullmatch(value) else None


def _key_value_blocks(lines):
    """(the ordinary lines, in order; the values of the last block that a
    `progress=continue` or `progress=end` line ends, or None; the key=value
    lines after it that no such line has ended yet: a block cut in two by
    the pipe, whose end the next read brings)."""
    ordinary, block, latest = [], [], None
    for line in lines:
        pair = _key_value(line)
        if pair is None:
            ordinary += [kept for kept, _ in block] + [line]
            block = []
        elif pair[0] == "progress":
            values = dict(kept for _, kept in block)
            if any(key.startswith("out_time") for key in values):
                latest = values
            else:                 # not ffmpeg's: the program's own lines
                ordinary += [kept for kept, _ in block] + [line]
            block = []
        else:
            block.append((line, pair))
    return ordinary, latest, [kept for kept, _ in block]


def _key_value_progress(values):
    """(done, fields) of one block: the frame it is at, and its numbers
    named as ffmpeg's stats line names them; the output's bitrate is the
    rate, in bits/s, as on that line. A value that is no number (N/A until
    ffmpeg knows it) is left out."""
    fields = {}
    for key, name, read in (("frame", "frame", int), ("fps", "fps", float),
                            ("speed", "speed", lambda v: float(v.rstrip("x"))),
                            ("total_size", "total_size", int),
                            ("out_time_us", "out_time_s", lambda v: round(int(v) / 1e6, 3)),
                            ("bitrate", "rate", lambda v: float(v[:-len("kbits/s")]) * 1000
                             if v.endswith("kbits/s") else float("nan"))):
        try:
            fields[name] = read(values[key])
        except (KeyError, ValueError, OverflowError):
            pass
    fields = {name: value for name, value in fields.items() if _is_finite_number(value)
              and value >= 0}       # ffmpeg's times before the first frame, for one
    if "rate" in fields:
        fields["rate_unit"] = "bits/s"
    return fields.get("frame"), fields


def _same_state(bar, other):
    return (other["desc"], other["done"], other["total"]) == \
        (bar["desc"], bar["done"], bar["total"])


class _OutputScreen:
    """A program's output laid out as a terminal would, as far as progress
    bars need: text finished by a newline at the home row is a log line;
    bars (tqdm's or another program's, see `_parse_bar`) are kept by row in
    `bars` ({position: bar}) with `changed` set when one moves.

    A line redrawn in place (\\r, backspaces) is one line in its last state:
    a log line once it ends with a newline, never one per redraw. A
    progress line that ends is kept once; of a run of ended progress lines
    of one stage (wget's dots, progressbar2 off a terminal) the first and
    the last are kept, but every record ("Epoch 3/10: loss=0.31").

    A text drawn below the home row is a nested bar if the cursor comes back
    up after it; if the next move is another \\r or \\n, the home row moved
    down to it instead (a bar closed with leave=True, then the next one),
    and the rows above it ended. So that first draw waits for the next one,
    except below a finished bar, or when the program never moved the cursor
    up (then a newline ends its line at once); a draw at the home row that
    ends a read is taken at once. A move up past the home row says the rows
    counted so far were lower: they move down by as much. A finished bar's
    newline at the home row ends its line, unless bars still show below it
    (one block of rows, as rich draws its tasks)."""

    def __init__(self):
        self.row = 0
        self.text = ""            # drawn on the current row since its last \r or \n
        self.dropped = 0          # characters of that text past OUTPUT_LINE_LIMIT
        self.taken = None         # that text, already taken as a bar at the end of a read
        self.redrawn = False      # the current row was drawn over (after a \r)
        self.back = 0             # characters the cursor stands left of the text's end
        self.bars = {}
        self.drawn = {}           # position -> the text of its bar
        self.cleared = set()      # positions blanked out, still counted until an outer bar moves
        self.carry = ""           # the start of a move that the next read finishes
        self.changed = False
        self.moved_up = False     # the program draws bars on several rows
        self.heading = None       # a count on a line of its own, just before (HEADING)
        self.stage = NO_STAGE     # the stage of the latest ended progress line
        self.held = None          # the last ended progress line of that stage, not kept yet
        self.shape = None         # the latest ended progress line without its numbers
        self.levels = []          # the levels last published, for inner bars that went away
        self.key_values = []      # ffmpeg -progress lines whose block a later read ends

    def feed(self, text):
        """Lay out more output; the log lines it finished. A move cut in two
        by the end of a read (ESC [ then A, \r then \n) waits for its end."""
        lines = []
        text, self.carry = self.carry + text, ""
        cut = UNFINISHED_MOVE.search(text, max(0, len(text) - 16))    # only the end matters
        if cut:
            text, self.carry = text[:cut.start()], text[cut.start():]
        parts = text.split("\n")
        begun, parts[0] = self.text, self.text + parts[0]
        if self.row == 0 and not any("nests" in bar for bar in self.bars.values()) \
                and set(self.bars) <= {0} and not self.dropped and not self.redrawn \
                and self.held is None and "\r" not in text and "\x1b" not in text \
                and "\x08" not in text and max(map(len, parts)) <= OUTPUT_LINE_LIMIT:
            # Plain output at the home row: whole lines in bulk, and no
            # Python work per line unless the read holds a hint of progress.
            self.text, self.taken = parts.pop(), None
            if not any(mark in text or mark in begun for mark in METER_MARKS):
                if parts:
                    lines.extend(parts)
                    self.stage, self.heading = NO_STAGE, None
            else:
                for part in parts:
                    like = self._like_last_bar(part)
                    bar = self._draw(0, part, like) if like or METER_HINT.search(part) else None
                    self.drawn.pop(0, None)
                    self._end(lines, part, bar)
        else:
            self._lay_out(text, lines)
        if self.row == 0 and self.text.strip() and self.text != self.taken and not self.dropped \
                and self._whole(self.text) and self._draw(0, self.text, redrawn=True):
            self.taken = self.text                # a whole draw, at the home row
        return lines

    def _whole(self, text):
        """Whether a draw that ends a read is whole, not the start of one
        that the next read finishes: a move comes next, or it ends as
        tqdm's does, or (drawn over) in a space or a bracket."""
        return self.carry[:1] == "\r" or text.endswith("]") or \
            self.redrawn and text[-1] in " )" and "%|" not in text

    def close(self):
        """End of output: what is left is finished."""
        lines = []
        self._lay_out(self.carry, lines)
        self.carry = ""
        self._finish(lines, newline=True)
        self._rows_ended(lines, self.row + 1)
        self._flush(lines)
        return lines

    def _lay_out(self, text, lines):
        at = 0
        for move in CURSOR.finditer(text):
            self._add(text[at:move.start()])
            at = move.end()
            step = move.group(0)
            if step.endswith("A"):
                self.moved_up = True
                self._finish(lines, up=True)
                self.redrawn = False
                self._up(int(move.group(1) or 1))
            elif step == "\r":
                self._finish(lines)
                self.redrawn = True
            elif step[0] == "\x08":
                self.back = min(len(self.text), self.back + len(step))
            elif self._finish(lines, newline=True) != "line":
                self.row += 1
        self._add(text[at:])

    def _up(self, rows):
        """The cursor moves up. Above the home row, the rows drawn so far
        were that much lower than counted: the newline before them was a
        move down, not a line's end (tqdm's bar at position 1, drawn after
        a "\n" of its own: Hugging Face's downloads)."""
        above = rows - self.row
        self.row = max(0, self.row - rows)
        if above > 0:
            self.bars = {p + above: bar for p, bar in self.bars.items()}
            self.drawn = {p + above: text for p, text in self.drawn.items()}
            self.cleared = {p + above for p in self.cleared}

    def _add(self, piece):
        if self.back and piece:                   # after backspaces: written over
            at = len(self.text) - self.back
            self.text = self.text[:at] + piece + self.text[at + len(piece):]
            self.back = max(0, self.back - len(piece))
            piece = ""
        room = OUTPUT_LINE_LIMIT - len(self.text)
        if len(piece) > room:
            self.dropped += len(piece) - max(0, room)
            piece = piece[:max(0, room)]
        self.text += piece

    def _finish(self, lines, up=False, newline=False):
        """The current row's text is done: a bar, a blank, or a log line.
        Returns which ("bar", "blank", "line", "drawn"), or None for no
        text. A \r only ends a draw: a row's last draw ends with its newline."""
        text, dropped, taken, redrawn = self.text, self.dropped, self.taken, self.redrawn
        self.text, self.dropped, self.taken, self.back = "", 0, None, 0
        if newline:
            self.redrawn = False
        if "\x1b" in text:
            text = LOG_ESCAPES.sub("", text)
        if not text.strip():
            if not text and newline and redrawn and self.row == 0 and 0 in self.drawn:
                self._end(lines, self.drawn.pop(0), self.bars.get(0))   # "45%\r", then "\n"
                return "line"
            if not text:
                return None
            # A bar closed with leave=False, or tqdm.write() clearing every
            # bar before it redraws them: the bar still counts until one
            # outside it moves on, so the percent never dips in between.
            if self.row in self.bars:
                self.cleared.add(self.row)
            self.drawn.pop(self.row, None)
            return "blank"
        if self.row > 0 and not up:
            self._rows_ended(lines, self.row)   # the home row moved down to here
            self.row = 0
        bar = self.bars.get(0) if text == taken and self.row == 0 else None if dropped else \
            self._draw(self.row, text, redrawn or not newline or self._like_last_bar(text))
        if newline and self.row == 0:
            if bar is None or _finished(bar) and not self._bars_below() or \
                    not (self.moved_up or "nests" in bar):
                self.drawn.pop(0, None)
            if bar is not None and 0 not in self.drawn:
                self._end(lines, text, bar)                     # this line ended
                return "line"
        if bar is not None:
            return "bar"
        if dropped:
            text += " [line cut: %d characters in all]" % (len(text) + dropped)
        if newline:
            self._end(lines, text, None)
            return "line"
        if self.row == 0:
            self.drawn[0] = text                  # drawn, not ended: kept if it ends
            return "drawn"
        return "line"

    def _bars_below(self):
        """Whether a bar still shows below the home row: a finished bar's
        newline there moves to it (rich's tasks, one block), not a line's end."""
        return any(position > 0 and position not in self.cleared for position in self.bars)

    def _rows_ended(self, lines, below):
        """The rows above `below` scrolled up, ended: keep their last draws."""
        for position in sorted(p for p in self.drawn if p < below):
            text = self.drawn.pop(position)
            if position not in self.cleared:
                self._end(lines, text, self.bars.get(position))

    def _end(self, lines, text, bar):
        """A line ended: a log line, or (`bar`) a progress line, kept as
        the class says."""
        if bar is not None and not bar.get("record"):
            stage = bar["desc"], METER.sub("", OTHER_ESCAPES.sub("", text)).strip()   # not its numbers
            self.shape = stage[1]
            if stage == self.stage:
                self.held = text                  # the same run: its latest
                return
            self._flush(lines)
            self.stage = stage
        elif text.strip():
            self._flush(lines)
            self.stage = NO_STAGE
            self.heading = HEADING.fullmatch(text) if bar is None and "/" in text else None
            if self.heading:
                self.bars.clear()     # the bar above it ended: its count is the last epoch's
        lines.append(text)

    def _like_last_bar(self, text):
        """Whether a line is shaped as the latest progress line that ended
        (its words without its numbers): dd's closing "... copied, 7.5 s,
        418 MB/s" after its redraws is that bar's last state."""
        return self.shape is not None and ("/s" in text or "%" in text) and \
            METER.sub("", OTHER_ESCAPES.sub("", text)).strip() == self.shape

    def _flush(self, lines):
        if self.held is not None:
            lines.append(self.held)
            self.held = None

    def _draw(self, position, text, redrawn=False):
        if _key_value(text) is not None:
            return None           # ffmpeg's key=value line (speed=1.02x): part of a block
        bar = _parse_bar(text, redrawn)
        if bar is None:
            return None
        if position not in self.bars and _finished(bar) and any(
                _same_state(bar, other) for other in self.bars.values()):
            return bar            # a finished bar drawn again a row away (tqdm's close of
                                  # a bar below its cursor's row): not a new bar
        self.cleared.discard(position)
        self.drawn[position] = text
        if self.bars.get(position) != bar:
            self.bars[position] = bar
            self.changed = True
            for inner in [p for p in self.cleared if p > position]:
                del self.bars[inner]
                self.cleared.discard(inner)
        return bar


DESCRIBED_COUNT = re.compile(r"(?P<label>.*?)\s*\b(?P<k>\d+)\s*/\s*(?P<n>\d+)\b")


def _bars_levels(bars, heading=None):
    """[label, done, total] levels, fields and innermost bar from the bars
    on screen, outermost first. A lone bar under a heading ("Epoch 3/10",
    Keras), or whose description holds its own count, is the inner level of
    that count: epoch 3 is running, 2 are done."""
    if not bars:
        return [], {}, None
    levels = [[bar["desc"], bar["done"], bar["total"]] for bar in bars]
    fields = {}
    for bar in bars:
        fields.update(bar["fields"])
    counted = heading or DESCRIBED_COUNT.match(bars[0]["desc"] or "")
    if counted and int(counted.group("n")) > 0 and len(bars) == 1:
        k, n = int(counted.group("k")), int(counted.group("n"))
        levels.insert(0, [counted.group("label").strip(" :-") or None, max(0, min(k, n) - 1), n])
    return levels, fields, bars[-1]


def _parse_progress_line(line):
    """(done, total, fields) for a JSON progress line, or None."""
    text = line.strip()
    if not text.startswith("{"):
        return None     # most lines: nothing to parse
    try:
        data = _json_value(text)       # a line nested too deeply is no progress either
    except ValueError:
        return None
    done = data.get("done") if isinstance(data, dict) else None
    if not _is_finite_number(done):
        return None
    total = data.get("total")
    fields = {k: v for k, v in data.items()
              if k not in ("done", "total") and (k == "stage" or k not in RESERVED_FIELDS)}
    return done, total if _is_finite_number(total) else None, fields


# A line's level from what it says, not from the stream it came on: most
# programs write progress and chatter to stderr. A level word among a line's
# first four words, as log formats put it ("ERROR", "error:", "[warn]",
# "npm warn", "E:" of apt, gcc's "file.c:3: warning:"), a traceback or an
# exception's line, indented or not (pytest's warnings summary), pytest's
# "E   " lines that explain a failure; INFO or DEBUG first says info.
LINE_LEVEL = re.compile(
    r"^\s*(?:\S+\s+){0,3}?(?:"
    r"(?P<info>\[?(?:INFO|DEBUG|NOTICE|TRACE)\b)"
    r"|(?P<error>\[?(?:ERROR|FATAL|CRITICAL|PANIC|FAILED|ERR!)(?![\w-])"
    r"|[\[<]?(?i:error|fatal|critical|panic)(?:\[\w+\])?[\]>]?[:!]|\[(?i:error|fatal)\]|E:"
    r"|Traceback \(most recent call last\)|\w*(?:Error|Exception):|Failed to\b)"
    r"|(?P<warning>\[?(?:WARNING|WARN)\b|[\[<]?(?i:warning|warn)[\]>]?[:!]|\[(?i:warn)\]|W:"
    r"|\w*Warning:))"
    r"|^[a-z]+ (?:(?P<error2>error|ERR!)|(?P<warning2>warn|WARN))\b|^(?P<error3>E {3})", re.M)
LEVEL_WORDS = ("err", "fatal", "critical", "panic", "warn", "traceback", "exception", "fail")


def _level_hint(text):
    """Whether `text` may hold a level word at all (str's own search: the
    cheap look at every line of every run)."""
    lowered = text.lower()
    return any(word in lowered for word in LEVEL_WORDS) or "E:" in text or "W:" in text \
        or "E   " in text


def _line_level(text):
    """"error", "warning" or "info": what a line of a program's output says
    it is (the most severe of a message's lines)."""
    if not _level_hint(text):
        return "info"
    if "\x1b" in text:
        text = OTHER_ESCAPES.sub("", text)
    found = {match.lastgroup for match in LINE_LEVEL.finditer(text)}
    if found & {"error", "error2", "error3"}:
        return "error"
    return "warning" if found & {"warning", "warning2"} else "info"


class _CommandOutput:
    """Turns a program's output into events: a JSON object with a numeric
    `done` is progress, tqdm's bars are progress (see `_OutputScreen` and
    `_parse_tqdm`), every other line a log event.

    A run may send OUTPUT_BURST_LINES lines as separate events, refilled at
    OUTPUT_LINES_PER_S; past that, the lines of one read are joined into one
    event, so a program that floods its output costs few events and never
    slows other runs. Bars cost at most one event per read, and none when a
    redraw changed nothing but tqdm's clock."""

    def __init__(self, session, echo=None):
        self._session = session
        self._progress = Progress(session)
        self._echo = echo or {}           # stream name -> binary file it is also copied to
        self._lock = threading.Lock()     # guards _allowance, _refilled, _shown (two readers)
        self._allowance = OUTPUT_BURST_LINES
        self._refilled = time.monotonic()
        self._shown = None                # what the last bar event said, without the clock
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL_LINES)

    def read(self, pipe, stream):
        """A reader thread's body: read until end of file, never blocking the
        job or the writer (the pipe is this thread's alone). Should reading
        fail unexpectedly, the error is logged and the rest of the output is
        drained, unread, so the program never blocks on a full pipe."""
        with pipe:
            try:
                self._read(pipe, stream)
            except Exception as exc:
                log.error("run %s: reading the program's %s failed", self._session.id, stream,
                          exc_info=True)
                self._session.publish("log", {
                    "message": "sse_demo could not read this output (%s); the rest of the %s "
                               "is discarded" % (_describe_exception(exc), stream),
                    "level": "error", "stream": stream})
                while pipe.read1(OUTPUT_READ_BYTES):
                    pass

    def _read(self, pipe, stream):
        screen = _OutputScreen()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            data = pipe.read1(OUTPUT_READ_BYTES)
            if not data:
                break
            self.take(screen, decoder, data, stream)
        self.take(screen, decoder, b"", stream, final=True)

    def take(self, screen, decoder, data, stream, final=False):
        """Output read from `stream` (bytes; b"" and `final` at its end) as
        events, through its `screen` and `decoder`; echoed when asked."""
        echo = self._echo.get(stream)
        if echo is not None and data:
            try:
                echo.write(data)
                echo.flush()
            except (OSError, ValueError):
                self._echo.pop(stream, None)     # a closed terminal: events still go
        lines = screen.feed(decoder.decode(data, final=final))
        self._take(screen, lines + screen.close() if final else lines, stream, final)

    def _take(self, screen, lines, stream, final=False):
        block = None
        if screen.key_values or lines and (_key_value(lines[-1]) or
                                           "progress=" in "\n".join(lines)):
            # ffmpeg's -progress blocks; any other read (a flood of plain
            # lines) costs one look at its last line and one search
            lines, block, screen.key_values = _key_value_blocks(screen.key_values + lines)
        if final:
            lines, screen.key_values = lines + screen.key_values, []
        self._publish_lines(lines, stream)
        if block is not None:              # one event a read, like bars
            done, fields = _key_value_progress(block)
            self._progress._report(done, fields=fields)
        if screen.changed:
            screen.changed = False
            self._publish_bars(screen)

    def _publish_bars(self, screen):
        """One progress event for the bars on `screen`, outermost first.

        Inner bars that went away while an outer one moved on (tqdm's
        leave=False at an epoch's end) count as restarted, so that the
        whole run keeps its unit (the innermost step) and its rate; the rate
        and its unit are the innermost bar's, and the ETA only that of a
        bar that is the whole run."""
        drawn = [screen.bars[p] for p in sorted(screen.bars)]
        if len(drawn) > 1 and not all("nests" in bar for bar in drawn):
            drawn = [min(drawn, key=_fraction)]    # side by side (rich's tasks): the slowest
        heading = screen.heading if len(drawn) == 1 else None
        levels, fields, inner = _bars_levels(drawn, heading)
        if not levels:
            return
        known = screen.levels
        if len(levels) < len(known) and \
                [label for label, _, _ in known[:len(levels)]] == [l[0] for l in levels]:
            levels += [[label, 0, total] for label, _, total in known[len(levels):]]
            inner = None                  # the outer bar's own rate is not the run's
        screen.levels = levels
        stage = " · ".join(([heading.group(0).strip()] if heading else []) +
                           [bar["desc"] for bar in drawn[-2:] if bar["desc"]]) or None
        shown = (stage, [tuple(level) for level in levels], sorted(fields.items()))
        with self._lock:
            if shown == self._shown:
                return                    # only the clock moved
            self._shown = shown
        if inner is not None and inner["rate"] is not None:
            fields["rate"], fields["rate_unit"] = inner["rate"], inner["unit"]
        if len(levels) == 1 and inner is not None and inner["eta"] is not None:
            fields["eta_s"] = inner["eta"]
        try:
            if len(levels) == 1:
                self._progress._report(levels[0][1], levels[0][2], stage, fields=fields)
            else:
                self._progress._report(None, stage=stage, bars=levels, fields=fields)
        except (TypeError, ValueError):
            log.debug("progress from a bar not published", exc_info=True)

    def _publish_lines(self, lines, stream):
        lines = [line.rstrip() for line in lines if line and not line.isspace()]
        if stream == "stderr":
            self.stderr_tail.extend(lines)
        allowed = self._take_allowance(len(lines))
        leveled = _level_hint("\n".join(lines))   # one look at the read, not one a line
        for line in lines[:allowed]:
            self._publish_line(line, stream, leveled)
        if len(lines) > allowed:
            joined, latest, carried = [], None, {}
            for line in lines[allowed:]:
                progress = _parse_progress_line(line)
                if progress is None:
                    joined.append(line)
                else:       # only the latest counts, with each field's latest value
                    latest, carried = line, _latest_after(carried, progress[2])
            if latest is not None:
                self._publish_line(latest, stream, leveled, carried)
            if joined:
                self._log("\n".join(joined), stream, leveled)
            # A flood: let the pipe fill before the next read (the program
            # waits on it, not the server), so that each read, and so each
            # event, carries many lines, and the other threads get the GIL.
            time.sleep(OUTPUT_FLOOD_PAUSE_S)

    def _take_allowance(self, wanted):
        with self._lock:
            now = time.monotonic()
            self._allowance = min(OUTPUT_BURST_LINES, self._allowance +
                                  (now - self._refilled) * OUTPUT_LINES_PER_S)
            self._refilled = now
            allowed = min(wanted, int(self._allowance))
            self._allowance -= allowed
            return allowed

    def _publish_line(self, line, stream, leveled=True, carried=None):
        """A progress event, or else a log event, of one line; `carried`:
        the fields of the progress lines a flood left out before it (their
        latest values), which the event brings too when they are JSON."""
        progress = _parse_progress_line(line)
        if progress is not None:
            done, total, fields = progress
            stage = fields.pop("stage", None)
            for fields in (_latest_after(carried or {}, fields), fields):
                try:
                    self._progress._report(done, total, stage if isinstance(stage, str)
                                           else None, fields=fields)
                    return
                except (TypeError, ValueError):
                    pass    # fields that are not JSON: then the line as it is
        self._log(line, stream, leveled)

    def _log(self, text, stream, leveled=True):
        """A log event, bounded already: a line by OUTPUT_LINE_LIMIT, joined
        lines by the size of one read."""
        data = {"message": text, "level": _line_level(text) if leveled else "info"}
        if stream:                  # (a file --tail follows is neither stream)
            data["stream"] = stream
        self._session.publish("log", data)


def _run_program(session, command, kill_after_s, groups, echo=None):
    """Start the program in its own process group, turn its output into
    events, stop it on cancel, and end the run with exactly one terminal
    event from its exit status, which it returns (None when it did not
    start). `session` may stand in for one (`sse_demo.py report`)."""
    mark = secrets.token_urlsafe(TOKEN_BYTES)     # proves after a crash that we started it
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **{PROCESS_MARK: mark}),
            start_new_session=hasattr(os, "killpg"))
    except FileNotFoundError:
        return _end_run(session, "error", {"message": "program not found: %s" % command[0]})
    except OSError as exc:
        return _end_run(session, "error", {"message": "cannot run %s: %s" % (command[0],
                                                                             exc.strerror or exc)})
    groups.add(process.pid)
    output = _CommandOutput(session, echo)
    readers = [threading.Thread(target=output.read, args=(pipe, name), daemon=True,
                                name="output-%d" % process.pid)
               for pipe, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
    try:
        session.note_process(dict(_process_identity(process.pid), mark=mark))
        for reader in readers:
            reader.start()
    except Exception as exc:    # a reader thread that cannot start: nothing may be left
        log.error("run %s could not start", session.id, exc_info=True)
        _kill_group(process.pid, HARD_KILL)
        process.wait()
        groups.discard(process.pid)
        for pipe in (process.stdout, process.stderr):
            pipe.close()
        _end_run(session, "error", {"message": "the run could not start: %s"
                                    % _describe_exception(exc)})
        return None
    try:
        cancelled, forced = _wait_or_cancel(process, session.cancel, kill_after_s)
    finally:
        _kill_group(process.pid, HARD_KILL)   # what it left
        groups.discard(process.pid)
        for reader in readers:
            reader.join(kill_after_s + 1.0)
    if forced:              # after the last of its output, just before the end
        _say_forced(session, command, kill_after_s, (echo or {}).get("stderr"))
    if cancelled:
        _end_run(session, "cancelled", {})
    elif process.returncode == 0:
        _end_run(session, "complete", {"result": {"exit_code": 0}})
    else:
        _end_run(session, "error", _exit_fields(_program_name(command), process.returncode,
                                                output.stderr_tail))
    return process.returncode


def _run_command(session, argv, values, kill_after_s, groups):
    """The worker thread's body for --cmd: the template filled in, run."""
    return _run_program(session, _fill_command(argv, values), kill_after_s, groups)


class _CommandJob(JobSpec):
    """A JobSpec that runs a program for each run (see `_run_command`),
    named `title` or after its program (`train.py`, not the template). It
    gives a run stopped at shutdown its --kill-after, and kills every
    program's group when the server stops."""

    def __init__(self, template, kill_after_s, title):
        argv, defaults = _parse_command(template)
        self._groups = _CommandGroups()

        def run(session, values):
            _run_command(session, argv, values, kill_after_s, self._groups)
        name = _program_name(argv)
        super().__init__(name, title or name, "Runs \u201c%s\u201d for each run: its output "
                         "is the log, its progress lines the progress." % template.strip(),
                         {name: _Param(name, default) for name, default in defaults.items()},
                         [], run,     # none declared: a program may never send a rate,
                         # and a declared field has a card from the start ("Rate –" all run)
                         check=lambda values: _fill_command(argv, values))
        self.kill_after_s = kill_after_s
        self.stop_grace_s = kill_after_s + WORKER_STOP_GRACE_S

    def describe(self):
        return dict(super().describe(), kill_after_s=self.kill_after_s)

    def stop_all(self):
        self._groups.close()

    def kill_now(self):
        self._groups.kill_all()


def command_job(template, kill_after_s=DEFAULT_KILL_AFTER_S, title=None):
    """The job that runs `template` (see _CommandJob). Raises ValueError for
    a template it cannot run, a program not found among them: every run
    would fail the same way."""
    argv, _ = _parse_command(template)
    if shutil.which(argv[0]) is None:
        raise ValueError("--cmd: program not found: %s (not a file, or not executable, or "
                         "not on PATH)" % argv[0])
    in_script = _script_placeholder(argv)
    if in_script:
        log.warning("warning: --cmd puts {%s} inside the script that %s runs with -c, where "
                    "a run's value is code that runs: pass it as an argument instead (%s -c "
                    "'... \"$1\" ...' %s {%s=...})", in_script, argv[0], argv[0], argv[0],
                    in_script)
    return _CommandJob(template, kill_after_s, title)


def _end_leftover_group(identity):
    """After a crash: kill the process group of a run's program if its
    leader still runs and is provably the one the server started: the same
    pid, start time and boot, and the random mark the server gave it in its
    environment, which /proc/<pid>/environ shows only to its own user and
    root. The rest any process can read of any other, so without the mark a
    journal planted in the state directory, or a pid recycled after a
    reboot, could name an unrelated group. True if it killed it."""
    if not isinstance(identity, dict) or "start" not in identity or not hasattr(os, "killpg"):
        return False
    pid, mark = identity.get("pid"), identity.get("mark")
    if not isinstance(pid, int) or pid <= 1 or not isinstance(mark, str) or \
            dict(_process_identity(pid), mark=mark) != identity:
        return False
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            if ("%s=%s" % (PROCESS_MARK, mark)).encode() not in f.read().split(b"\0"):
                return False
        if os.getpgid(pid) != pid:
            return False
        os.killpg(pid, HARD_KILL)
    except OSError:
        return False
    return True


###############################################################################
# Runs that outlive the server: the journal (--state-dir)
###############################################################################

JOURNAL_FORMAT = "sse_demo-journal"
JOURNAL_VERSION = 1
JOURNAL_SUFFIX = ".jsonl"
DAMAGED_SUFFIX = ".damaged"       # a file's unreadable tail, set aside beside it
JOURNAL_PROGRESS_BYTES = 32 * 2 ** 20   # events waiting for the disk: past this many bytes,
JOURNAL_QUEUE_BYTES = 256 * 2 ** 20     # progress is not journaled, past this log lines
JOURNAL_RUN_BYTES = 16 * 2 ** 20        # neither (nor past this many of their own run's);
                                        # a terminal event always is
JOURNAL_PROGRESS_S = 1.0          # a run's progress is written at most this often (the newest),
JOURNAL_PROGRESS_LINES = 2000     # and half as often after each this many progress lines
JOURNAL_FLUSH_S = 1.0             # the journal thread writes what has come every this often
                                  # (a terminal event at once): each flush is a system call
                                  # per run, and each costs the other threads a GIL hand-off;
JOURNAL_STOPPING_FLUSH_S = 0.05   # this often once the server stops, and a second Ctrl-C
JOURNAL_EXIT_WAIT_S = 2.0         # waits at most this for what is queued to be written
ID_BLOCK = 1000                   # ids a run may publish past the mark the journal holds
ID_MARK_WAIT_S = 5.0              # how long a run waits for the journal to write a mark
INTERRUPTED = ("the server stopped during the run (interrupted); "
               "its events up to then are kept")

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)    # never follow a link out of DIR


class _IdMark:
    """A run's high-water mark in its journal. The run publishes an id only
    within a mark the operating system holds, so after a crash its terminal
    event takes an id past the mark (see _interrupted_event) and no client
    ever sees an id go back. The next mark is asked for half a block ahead;
    the run waits only when the disk is that far behind. _Session.publish
    asks it, outside the run's lock and then under it."""

    def __init__(self, journal, session):
        self.upto = session.last_id       # nothing is granted past what it has
        self._journal = journal
        self._session = session
        self._lock = threading.Lock()     # guards upto's rise

    def covers(self, event_id):
        return event_id <= self.upto

    def keep_ahead(self):
        session = self._session
        if self.upto - session.last_id == ID_BLOCK // 2:
            self._journal.reserve_ids(session, self.upto + ID_BLOCK, wait=False)
        while session.last_id >= self.upto:
            self._journal.reserve_ids(session, session.last_id + ID_BLOCK, wait=True)

    def raise_to(self, upto):
        """The journal has written the mark `upto`."""
        with self._lock:
            self.upto = max(self.upto, upto)


def _journal_path(directory, session_id, suffix=JOURNAL_SUFFIX):
    """A run's file: named from its session id, once the id's shape is checked."""
    if not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise OSError("not a session id: %r" % session_id)
    return os.path.join(directory, session_id + suffix)


def _delete_journal(directory, session_id):
    """Delete a run's file and the damaged tail set aside from it, if any:
    both go when the run expires."""
    for suffix in (JOURNAL_SUFFIX, JOURNAL_SUFFIX + DAMAGED_SUFFIX):
        try:
            os.unlink(_journal_path(directory, session_id, suffix))
        except FileNotFoundError:
            pass


def _open_journal(directory, name, mode, suffix=JOURNAL_SUFFIX):
    """A journal file, created private to this user, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | NOFOLLOW | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    return os.fdopen(os.open(_journal_path(directory, name, suffix), flags, 0o600), mode)


def _series_line(session):
    """After a run's terminal event: its whole series, which the thinned
    progress events of a long run could not give back."""
    return (_json_line({"series": session.series_state()}) + "\n").encode()


def _history_line(session):
    """After the series: the progress events of the run's held history that
    the journal thinned, so that a run read back has the same last
    HISTORY_LIMIT events as before (its /export keeps the thinned ones)."""
    held = [_export_line(e.id, e.name, e.json)[:-1]
            for e in session.events_after(0, HISTORY_LIMIT) if e.name == "progress"]
    return b'{"history":[' + b",".join(held) + b"]}\n"


def _journal_header(session):
    """The run's first line. Its keys are kept, so that a run read back still
    answers its watch links and, while it waits in the queue, its starter's
    Cancel (the folder is the operator's own: DIR is made 0700)."""
    return (_json_line({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION,
                       "session_id": session.id, "title": session.title,
                       "params": session.params, "started_ts": session.started_ts,
                       "view_key": session.view_key, "control_key": session.control_key,
                       "report_key": session.report_key, "queued": session.state == "queued"})
            + "\n").encode()


def _skipped_line(count):
    """Where the journal left out a run's log lines (its disk was behind):
    a marker /log and /export show, as a record's own marker of lines
    dropped."""
    return _export_line(None, "log", _json_line({
        "message": "%d log lines were not journaled here: the disk fell behind" % count,
        "level": "warning", "ts": time.time()}).encode())


def _journal_line(event):
    return _export_line(event.id, event.name, event.json)


class _JournalFile:
    """One run's open journal file, and how its progress is thinned as it is
    written: a file is only ever appended to, never read back or rewritten,
    so the disk's work is the file's final size."""

    def __init__(self, file):
        self.file = file
        self.progress_lines = 0
        self.progress_at = None    # monotonic time of the last progress line written
        self.held = None           # the newest progress line, while it is not yet due

    def progress_due(self, now):
        """A progress line every JOURNAL_PROGRESS_S, half as often after each
        JOURNAL_PROGRESS_LINES: a week-long run keeps some 16,000."""
        if self.progress_at is None:
            return True
        doublings = self.progress_lines // JOURNAL_PROGRESS_LINES
        return now - self.progress_at >= JOURNAL_PROGRESS_S * 2 ** doublings


class _Journal(_RunListener):
    """Every event of every run, appended to `DIR/<session id>.jsonl` (one
    JSON object a line: a header, then {"id", "event", "data"} per event) by
    one thread of its own, so a job or the stream writer never waits for the
    disk. Every log line and terminal event is written; progress is state,
    not history, so of a run's progress events the journal writes the
    newest once a second (less often as a run grows long, see
    _JournalFile) and the last before its end; the run's whole series
    follows its terminal event. A terminal event is flushed and fsynced. A
    file is deleted when its run expires. Only this thread touches the
    files."""

    def __init__(self, directory):
        self.directory = directory
        self._items = collections.deque()   # (kind, session, event); appended from any thread
        self._wake = threading.Event()      # a terminal event or stop: write now
        self._files = {}                    # session id -> _JournalFile
        self.written = 0
        self._count_lock = threading.Lock() # guards dropped, waiting_bytes (many threads)
        self.dropped = 0
        self.waiting_bytes = 0              # the events' bytes in _items,
        self._run_bytes = collections.Counter()   # and each run's (session id -> bytes)
        self._skipped = collections.Counter()     # session id -> log lines not journaled
        self.error = None                   # the disk's last complaint, while it lasts
        self._turn_failed = False           # something failed in this turn of writes
        self._stopping = False
        self._hurried = False               # the server stops: write every turn soon
        self._exiting = False               # a second Ctrl-C: take no more events
        self._thread = None
        self._supervisor = None

    @staticmethod
    def prepare(directory):
        """Create DIR (private to this user) and prove it writable. Raises
        OSError with the reason."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        probe = os.path.join(directory, ".write-test-%d" % os.getpid())
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(probe)

    def start(self, supervisor):
        self._supervisor = supervisor
        self._thread = supervisor.spawn("journal", self._run)

    def begin(self, session):
        """A run starts: its file, with its first id mark, is queued for the
        disk. Returns the call that waits until both are written: POST
        /start makes it after its lock (a stalled disk holds up that request
        alone) and answers once the run is on disk, so even a crash in its
        first second leaves a trace of it."""
        self._queue("begin", session, None)
        self.guard_ids(session)
        return self.reserve_ids(session, ID_BLOCK, wait=False)

    def guard_ids(self, session):
        """From now on the run publishes ids only within marks this journal
        has written."""
        session.id_mark = _IdMark(self, session)

    def event(self, session, event):
        """Every event, under the session's lock: never blocks.
        The queue is bounded by its bytes, and holds each event as the
        history does (one copy of its payload). A terminal event is never
        dropped; while the disk is far behind, progress is (past
        JOURNAL_PROGRESS_BYTES waiting), and log lines past
        JOURNAL_QUEUE_BYTES, or past JOURNAL_RUN_BYTES of their own run (a
        flood costs its own run lines, not another's), counted in /healthz
        and said in the run's file where they would have been."""
        if self._exiting:
            return
        held, name = event.held(), session.id
        with self._count_lock:
            if not event.terminal and (self.waiting_bytes >= (
                    JOURNAL_PROGRESS_BYTES if event.name == "progress" else JOURNAL_QUEUE_BYTES)
                    or self._run_bytes[name] >= JOURNAL_RUN_BYTES):
                self.dropped += 1
                self._skipped[name] += event.name == "log"
                if self.dropped == 1 or self.dropped % 10000 == 0:
                    log.warning("the journal falls behind the disk: %d events not journaled",
                                self.dropped)
                return
            self.waiting_bytes += len(held[2])
            self._run_bytes[name] += len(held[2])
        self._queue("event", session, held)
        if event.terminal:
            self._wake.set()

    def _queue(self, kind, session, value):
        """Everything for the disk goes through here, so that after a
        second Ctrl-C (take_no_more) nothing more does."""
        if not self._exiting:
            self._items.append((kind, session, value))

    def forgotten(self, session):
        self._queue("forget", session, None)

    def process(self, session, identity):
        """A run's program started: written with the next flush."""
        self._queue("process", session, identity)

    def note_received(self, session, count):
        """A reported run has taken `count` events in all (after them in the
        file): a restart tells its reporter's next batch from one sent
        again."""
        self._queue("received", session, count)

    def reserve_ids(self, session, upto, wait):
        """Write `{"ids": upto}` to the run's file; once it is written to the
        operating system (a crash cannot lose it then), the run may publish
        ids up to `upto`. With `wait`, wait for that (a request thread or
        the run's own, never the stream writer, and never under a lock);
        without, returns the call that waits. A journal that cannot write
        does not stop the run: it goes on."""
        written = threading.Event()
        self._queue("ids", session, (upto, written))
        self._wake.set()

        def settle():
            self._wait_written(written, "run %s's id mark" % session.id)
            session.id_mark.raise_to(upto)
        if wait:
            settle()
        return settle

    def note_running(self, session):
        """A queued run starts: `{"running": ts}`, queued for the disk.
        Returns the call that waits until the operating system has it: the
        run's own thread makes it before the job runs, so a restart knows
        the run left the queue, and no other start waits for this disk."""
        written = threading.Event()
        self._queue("running", session, written)
        self._wake.set()
        return lambda: self._wait_written(written, "that run %s started" % session.id)

    def sync(self, session):
        """Wait until what is queued for the run is written to the operating
        system (a reported run's end: its reporter stops once answered, and
        could not send it again after a crash)."""
        written = threading.Event()
        self._queue("sync", session, written)
        self._wake.set()
        self._wait_written(written, "run %s's end" % session.id)

    def _wait_written(self, written, what):
        if self._stopping or self._thread is None or not self._thread.is_alive():
            return    # nobody to write it (shutting down): the run goes on
        if not written.wait(ID_MARK_WAIT_S):
            log.warning("the journal did not write %s in time", what)

    def stats(self):
        return {"ok": self.error is None, "queued": len(self._items), "written": self.written,
                "dropped": self.dropped, "error": self.error}

    def stop(self):
        """Write what is queued, then stop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def hurry(self):
        """The server has begun to stop: its runs' last lines (a program
        saying it saves its checkpoint) go to the disk within
        JOURNAL_STOPPING_FLUSH_S, not a second, so that a second Ctrl-C
        (`stop_at_once`) finds them written or about to be."""
        self._hurried = True
        self._wake.set()

    def take_no_more(self):
        """From a second Ctrl-C's handler, before it kills the programs:
        what follows is the kill's doing, not the runs', and is not
        journaled: a killed program's run failing with SIGKILL, a queued
        run started in the slot it left. A restart reads the runs back
        as a first Ctrl-C leaves them: interrupted, or still queued."""
        self._exiting = True

    def stop_at_once(self):
        """From a second Ctrl-C's handler, before the process exits: write
        what is queued and stop, waiting at most JOURNAL_EXIT_WAIT_S. It
        takes no lock the interrupted main thread could hold (not even the
        wake-up's): the thread sees the flag at its next turn, which is
        near once hurried, and a join waits for nothing else."""
        self._stopping = True
        if self._items and self._thread is not None:    # nothing queued: exit at once
            self._thread.join(JOURNAL_EXIT_WAIT_S)

    def _run(self):
        while True:
            self._wake.wait(JOURNAL_STOPPING_FLUSH_S if self._hurried else JOURNAL_FLUSH_S)
            self._wake.clear()
            stopping = self._stopping
            self._write_queued()
            if stopping:
                for name in list(self._files):
                    self._close(name)
                return

    def _write_queued(self):
        touched, ended, marks = set(), [], []
        now = time.monotonic()
        while self._items:
            kind, session, event = self._items.popleft()
            try:
                if kind == "ids":
                    marks.append((session, event))
                    self._append(session.id, b'{"ids":%d}\n' % event[0])
                elif kind == "begin":
                    self._append(session.id, _journal_header(session))
                elif kind == "sync":
                    marks.append((None, (0, event)))
                    continue
                elif kind == "running":
                    marks.append((None, (0, event)))
                    self._append(session.id, (_json_line({"running": session.began_ts})
                                              + "\n").encode())
                elif kind == "process":
                    self._append(session.id, (_json_line({"process": event})
                                              + "\n").encode())
                elif kind == "received":
                    self._append(session.id, b'{"received":%d}\n' % event)
                elif kind == "event":
                    with self._count_lock:
                        self.waiting_bytes -= len(event[2])
                        self._run_bytes[session.id] -= len(event[2])
                        if not self._run_bytes[session.id]:
                            del self._run_bytes[session.id]
                        skipped = self._skipped.pop(session.id, 0)
                    if skipped:
                        self._append(session.id, _skipped_line(skipped))
                    event = _Event.from_held(event)
                    self._write_event(session.id, event, now)
                    if event.terminal:
                        self._append(session.id, _series_line(session))
                        self._append(session.id, _history_line(session))
                        ended.append(session.id)
                else:
                    self._delete(session.id)
                touched.add(session.id)
            except OSError as exc:
                self._failed(exc)
            except Exception:
                self._supervisor.survived("journal")   # that item is lost, not the rest
        for name in touched:
            self._write_held_progress(name, now)
            self._flush(name, fsync=name in ended)
        for session, (upto, written) in marks:   # in the operating system now, or failed
            if session is not None:
                session.id_mark.raise_to(upto)
            written.set()
        for name in ended:
            self._close(name)
        if touched and not self._turn_failed:
            self._healthy()       # only a turn that reached the disk whole says so
        self._turn_failed = False

    def _file(self, name):
        entry = self._files.get(name)
        if entry is None:
            entry = self._files[name] = _JournalFile(_open_journal(self.directory, name, "ab"))
        return entry

    def _append(self, name, line):
        self._file(name).file.write(line)
        self.written += 1

    def _write_event(self, name, event, now):
        """A progress event is written when it is due, else held until it is
        (or until a newer one replaces it); any other event lets the held one
        go, written only before a terminal event, so ids stay in order."""
        entry = self._file(name)
        line = _journal_line(event)
        if event.name == "progress":
            entry.held = line
            if entry.progress_due(now):
                self._write_held_progress(name, now)
            return
        if event.terminal:
            self._write_held_progress(name, now, due=True)
        entry.held = None
        self._append(name, line)

    def _write_held_progress(self, name, now, due=False):
        entry = self._files.get(name)
        if entry is not None and entry.held is not None and (due or entry.progress_due(now)):
            self._append(name, entry.held)
            entry.held = None
            entry.progress_lines += 1
            entry.progress_at = now

    def _flush(self, name, fsync):
        entry = self._files.get(name)
        if entry is None:
            return
        try:
            entry.file.flush()
            if fsync:
                os.fsync(entry.file.fileno())
        except OSError as exc:
            self._failed(exc)

    def _close(self, name):
        entry = self._files.pop(name, None)
        if entry is not None:
            try:
                entry.file.close()
            except OSError as exc:
                self._failed(exc)

    def _delete(self, name):
        self._close(name)
        _delete_journal(self.directory, name)

    def _failed(self, exc):
        """The disk refused: said once per outage (an outage fails every
        turn, and a write into the file's buffer may pass where its flush
        then fails)."""
        self._turn_failed = True
        if self.error is None:
            log.error("cannot write the journal in %s (%s); serving from memory",
                      self.directory, exc.strerror or exc)
        self.error = str(exc.strerror or exc)

    def _healthy(self):
        if self.error is not None:
            log.warning("the journal can be written again")
            self.error = None


def _journal_export_lines(path, skip=0):
    """The /export lines of a run's journal file, one at a time, read as they
    are sent (a run's file can be far larger than memory should hold):
    every event line, and every marker of lines dropped, past the first
    `skip` of them."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b'{"id":') and line.endswith(b"}\n"):
                    if skip:
                        skip -= 1
                        continue
                    yield line
    except OSError as exc:
        log.warning("cannot read the journal %s: %s", path, exc.strerror or exc)


class _JournalRecord:
    """The record of a run read back after a restart: its journal file, read
    line by line when /log or /export asks, so it costs no memory meanwhile.
    The run has ended, so the file no longer grows: `end` is its count of
    export lines, counted when it was read back."""

    def __init__(self, path, end):
        self.path = path
        self.end = end

    def lines_after(self, position):
        """(the export lines from `position` on, as they are read; the next
        position)."""
        return _journal_export_lines(self.path, position), self.end


class _ContinuedRecord(_Record):
    """The record of a run that goes on after a restart (a reported run):
    the `before` export lines its journal file held when read back, then
    the events since, kept in memory and numbered on from there."""

    def __init__(self, path, before, budget_bytes, lock):
        super().__init__(budget_bytes, lock)
        self.path, self.before = path, before
        self.end = before

    def lines_after(self, position):
        newer, end = super().lines_after(position)
        if position >= self.before:
            return newer, end
        return itertools.chain(itertools.islice(_journal_export_lines(self.path, position),
                                                self.before - position), newer), end


def _set_aside_damaged_tail(directory, name, good_bytes):
    """Move a run's file's bytes past `good_bytes` to its `.damaged` file."""
    path = _journal_path(directory, name)
    with open(path, "rb") as f:
        f.seek(good_bytes)
        tail = f.read()
    with _open_journal(directory, name, "ab", suffix=JOURNAL_SUFFIX + DAMAGED_SUFFIX) as f:
        f.write(tail)
    with open(path, "r+b") as f:
        f.truncate(good_bytes)


def _mend_journal(directory, name, problem, good_bytes, interrupted):
    """Set a damaged tail aside, and write the `interrupted` event that a
    run read back without a terminal event got, so a second restart adds no
    other. Raises OSError when the disk refuses."""
    if problem is not None:
        log.warning("journal %s%s: %s; its events before that are kept, the rest is "
                    "moved to %s%s.damaged", name, JOURNAL_SUFFIX, problem, name, JOURNAL_SUFFIX)
        _set_aside_damaged_tail(directory, name, good_bytes)
    if interrupted is not None:
        with _open_journal(directory, name, "ab") as f:
            f.write(_journal_line(_Event(*interrupted)))
            f.flush()
            os.fsync(f.fileno())


def _only_finite(value):
    """Does `value`, as json.loads read it, hold only finite numbers?
    json.loads takes NaN, Infinity and 1e999 (infinity), which strict JSON,
    and so _json_line, refuses: a journal line with one is damaged, or the
    run's events, chart or /status could not be sent."""
    stack = [value]
    while stack:             # a loop, not recursion: JSON may nest a thousand deep
        item = stack.pop()
        if type(item) is float and not math.isfinite(item):
            return False
        if type(item) is dict:
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return True


def _read_series_line(line):
    """The series written after a terminal event, or None (a journal of an
    older version, or one cut short or damaged there: the events rebuilt it)."""
    try:
        state = _json_value(line.decode("utf-8"))["series"]
        _Series.from_state(state)
    except (ValueError, KeyError, TypeError):
        return None
    return state if _only_finite(state) else None


def _read_history_line(line, events):
    """The held progress events written after the series: merged into
    `events` (the last ones read, the terminal one last) in id order. A
    line cut short adds nothing: the run keeps the events its file has."""
    try:
        held = [(e["id"], e["event"], e["data"]) for e in _json_value(line.decode())["history"]]
        if not all(type(i) is int and name == "progress" and isinstance(data, dict)
                   and _only_finite(data) for i, name, data in held):
            return events
    except (ValueError, KeyError, TypeError):
        return events
    terminal = events.pop()
    merged = sorted(dict((e[0], e) for e in list(events) + held).values())
    events.clear()
    events.extend(merged[-(HISTORY_LIMIT - 1):] + [terminal])
    return events


def _read_journal_header(line):
    try:
        header = _json_value(line.decode("utf-8"))
    except ValueError:
        raise ValueError("its first line is not a journal header")
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        raise ValueError("its first line is not a journal header")
    if header.get("version") != JOURNAL_VERSION:
        raise ValueError("format version %r, this server reads %d"
                         % (header.get("version"), JOURNAL_VERSION))
    if not (isinstance(header.get("title"), str) and isinstance(header.get("params"), dict)
            and type(header.get("started_ts")) in (int, float) and _only_finite(header)):
        raise ValueError("its first line is not a journal header (title, params, started_ts)")
    return header


NOTES = {"process": lambda value: True,                   # --cmd: its program
         "running": lambda value: True,                   # it left the queue
         "received": lambda value: type(value) is int,    # a reported run: events taken
         "ids": lambda value: type(value) is int}         # the id mark


def _journal_entry(line, last_id):
    """One line after a journal's header: ("note", name, value); ("marker",
    None, None), a marker of log lines left out (shown, not an event); or
    ("event", None, (id, name, data)). Raises ValueError, KeyError or
    TypeError for a damaged one."""
    if not line.endswith(b"\n"):
        raise ValueError("cut short")
    record = _json_value(line.decode("utf-8"))
    note = next(iter(record), None) if isinstance(record, dict) and len(record) == 1 else None
    if note in NOTES and NOTES[note](record[note]):
        return "note", note, record[note]
    event = (record["id"], record["event"], record["data"])
    if event[0] is None and event[1] == "log" and isinstance(event[2], dict):
        return "marker", None, None
    if type(event[0]) is not int or event[0] <= last_id or \
            not isinstance(event[2], dict) or event[1] not in EVENT_NAMES:
        raise ValueError("not an event")
    if not _only_finite(event[2]):
        raise ValueError("a number that is not finite")
    return "event", None, event


def _read_journal(path, session_id):
    """(header, events, bytes that were good, the first problem or None),
    read line by line: `events` holds the last HISTORY_LIMIT, (id, name,
    data) each. The header gains what the lines after it said: `ids`,
    `running`, `process`, `series` (written after the run's end, or rebuilt
    from its progress), `latest` (the latest fields), `lines` (its export
    lines) and `only_queued`. Raises ValueError when the file is not a
    journal of that run that this version can read."""
    events = collections.deque(maxlen=HISTORY_LIMIT)
    series, latest, lines, only_queued, last_id = _Series(), {}, 0, True, 0
    problem, ended, counted = None, False, None
    with open(path, "rb") as f:
        first = f.readline()
        header = _read_journal_header(first)
        if header.get("session_id") != session_id:
            raise ValueError("its header names another run (%r)" % header.get("session_id"))
        good = len(first)
        for number, line in enumerate(f, 2):
            if ended:        # the series, then the held history
                if "series" not in header:
                    header["series"] = _read_series_line(line)
                    continue
                _read_history_line(line, events)
                break
            if line == b"\n":
                good += 1
                continue
            try:
                kind, note, event = _journal_entry(line, last_id)
            except (ValueError, KeyError, TypeError) as exc:
                problem = "line %d is damaged (%s)" % (number, exc)
                break
            good += len(line)
            if kind == "note":
                header[note] = max(header.get("ids", 0), event) if note == "ids" else event
                if note == "received":
                    counted = (good, lines, last_id)
                continue
            lines += 1
            if kind == "marker":
                continue
            events.append(event)
            last_id, only_queued = event[0], only_queued and event[1] == "queued"
            if event[1] not in ("log", "queued"):
                latest = _latest_after(latest, event[2])
                series.add(event[0], event[2])
            ended = event[1] in TERMINAL_STATES
    if counted is not None and not ended and last_id > counted[2]:
        # A reported run's events past its last count are a batch the crash
        # cut short: set aside, they come again with the reporter's resend.
        # (Its progress points stay in the series, where the same again
        # changes nothing.)
        good, lines, last_id = counted
        events = collections.deque(e for e in events if e[0] <= last_id)
        problem = problem or "events past the reporter's last counted batch"
    if header.get("series") is None:
        series.last_id = last_id
        header["series"] = series.state()
    header.update(latest=latest, lines=lines, only_queued=only_queued)
    return header, list(events), good, problem


def _interrupted_event(header, events, now):
    """The terminal event of a run the journal holds without one. Its id is
    past every id the run may have published (the journal's high-water
    mark, `ids`), so no client's Last-Event-ID is ever above it."""
    latest = header["latest"]
    data = _lasting_fields(latest)
    data.update({"message": INTERRUPTED, "reason": "interrupted", "ts": now})
    if "elapsed_s" in latest:
        data["elapsed_s"] = latest["elapsed_s"]
    return max(events[-1][0] if events else 0, header.get("ids", 0)) + 1, "error", data


JOURNALS_WORTH_SAYING = 500       # journals that take long enough to read back to say so


def _load_journal(directory, session_ttl_s):
    """Every run the journal holds within its TTL, as (header, events) with
    (id, name, data) events. A run that was waiting in the queue (it never
    left it) still waits: its header says `"waiting": true`; a run reported
    from elsewhere goes on: `"reported": true`. Any other run
    without its terminal event was interrupted: it gets an `error` event,
    written to its file so a second restart adds no other. Files past their
    TTL are deleted, with their `.damaged` tails. Damage never stops the
    server: a file is read up to its first bad line, with one warning; the
    bad tail is moved to `<file>.damaged`; a file that cannot be read at
    all is left where it is."""
    runs, now = [], time.time()
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        log.warning("the journal in %s cannot be read (%s); no run is read back",
                    directory, exc.strerror or exc)
        return runs
    count = sum(entry.name.endswith(JOURNAL_SUFFIX) for entry in entries)
    if count >= JOURNALS_WORTH_SAYING:      # seconds of a blank terminal otherwise
        log.info("reading back %d runs from the journal in %s (Ctrl-C: the server stops once "
                 "they are read)", count, directory)
    for entry in entries:
        name = entry.name[:-len(JOURNAL_SUFFIX)]
        if not entry.name.endswith(JOURNAL_SUFFIX) or entry.is_symlink() or \
                not re.fullmatch(SESSION_ID_PATTERN, name):
            continue
        try:
            header, events, good_bytes, problem = _read_journal(entry.path, name)
        except (OSError, ValueError) as exc:
            log.warning("journal %s not loaded, left in place: %s", entry.name, exc)
            continue
        if events and events[-1][1] in TERMINAL_STATES and \
                now - events[-1][2].get("ts", now) > session_ttl_s:
            try:
                _delete_journal(directory, name)
            except OSError as exc:
                log.warning("journal %s has expired but cannot be deleted: %s", entry.name, exc)
            continue
        header["waiting"] = header.get("queued") is True and "running" not in header and \
            header["only_queued"]
        ended = bool(events) and events[-1][1] in TERMINAL_STATES
        # A reported run goes on: its reporter, elsewhere, posts again.
        header["reported"] = not ended and isinstance(header.get("report_key"), str)
        interrupted = not header["waiting"] and not header["reported"] and not ended
        if interrupted:
            if _end_leftover_group(header.get("process")):
                log.warning("run %s: its program still ran after the server stopped; "
                            "its process group is killed", name)
            events.append(_interrupted_event(header, events, now))
            header["lines"] += 1
        try:
            _mend_journal(directory, name, problem, good_bytes,
                          events[-1] if interrupted else None)
        except OSError as exc:   # damage never stops the server: the run is served from memory
            log.warning("journal %s cannot be mended (%s); its run is served as read",
                        entry.name, exc.strerror or exc)
        runs.append((header, events))
    return runs


def _began_ts(header):
    """When a journal's run began running: when it left the queue (its
    `running` note), or, if it never waited, when it was accepted; None for
    a run reported from elsewhere, or one still queued."""
    if isinstance(header.get("report_key"), str):
        return None
    if header.get("queued") is not True:
        return header["started_ts"]
    began = header.get("running")
    return began if _is_finite_number(began) else None


def _session_read_back(header, events, path, listeners):
    """A run rebuilt from its journal: its history and series from `events`
    (the last of them terminal), its record left on disk at `path`, and its
    view key kept, so watch links outlive a restart (and a reported run's
    report key: its reporter's late post hears that the run has ended)."""
    session = _Session(header["session_id"], header["title"], header["params"], listeners)
    session.started_ts, session.began_ts = header["started_ts"], _began_ts(header)
    for name in ("view_key", "report_key"):
        if isinstance(header.get(name), str):
            setattr(session, name, header[name])
    session.record = _JournalRecord(path, header["lines"])
    session.replay(events)
    ended = events[-1][2]
    session.ids_may_pass_end = events[-1][1] == "error" and (       # ended by _load_journal
        ended.get("reason") == "interrupted" or ended.get("message") == INTERRUPTED)
    session.series = _Series.from_state(header["series"])
    return session


###############################################################################
# Notifications: a POST to --notify URL when a run ends
###############################################################################

NOTIFY_TIMEOUT_S = 10.0            # one delivery, whole, gives up
NOTIFY_RETRIES_S = (1.0, 5.0, 30.0)   # waits before the 2nd, 3rd and 4th attempt
NOTIFY_QUEUE_LIMIT = 1000          # notifications waiting; past it, new ones are dropped
NOTIFY_FORMATS = ("json", "slack")


def _shut_down(conn):
    """Shut an HTTP connection's socket from another thread: a read blocked
    on it ends at once. (socket.socket's own shutdown: an SSLSocket's would
    also drop its TLS state under the reading thread.)"""
    if conn.sock is not None:
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        except OSError:
            pass       # already closed


def _notify_text(body):
    """One line for a chat: "Build optimisation: complete (result 3.2) · 12 s"."""
    if body["state"] == "complete":
        outcome = "complete" if body.get("result") is None else \
            "complete (result %s)" % _json_line(body["result"])[:200]
    else:
        outcome = "%s: %s" % (body["state"], str(body.get("message", "")).split("\n")[0][:200])
    took = ""
    if body.get("ended_ts") and body.get("started_ts"):
        took = " · %d s" % round(body["ended_ts"] - body["started_ts"])
    return "%s: %s%s" % (body["title"], outcome, took)


class _Notifier(_RunListener):
    """Tells a URL that a run ended, from one thread of its own: a run's end
    only appends to a queue, so a receiver that is slow or down never delays
    a run or a stream. A failed delivery (an error status, a refused
    connection, no answer within NOTIFY_TIMEOUT_S) is tried again after
    each of NOTIFY_RETRIES_S, while later notifications go on; a receiver
    that keeps failing is logged once, until it answers again.

    With a key, each body is signed: `X-SSE-Demo-Signature: sha256=<hex
    HMAC-SHA256 of the body>`. The `slack` format sends `{"text": ...}`, the
    shape Slack's and Mattermost's incoming webhooks take."""

    def __init__(self, url, key=None, body_format="json"):
        self._parts = parts = self.check_url(url)
        # For the log: without user:password@ and the query, either of
        # which may hold the receiver's secret.
        self.shown = "%s://%s%s" % (parts.scheme, parts.netloc.rpartition("@")[2], parts.path)
        self.key = key
        self.body_format = body_format
        self._lock = threading.Lock()        # guards _due
        self._due = []                       # heap of (when, seq, attempt, body)
        self._seq = itertools.count()
        self._wake = threading.Event()
        self._stopping = False
        self._exiting = False                # a second Ctrl-C: no more runs' ends
        self._thread = None
        self._failing = False                # logged once per outage
        self.delivered = self.failed = self.dropped = 0

    @staticmethod
    def check_url(url):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("--notify wants an http:// or https:// URL, not %r" % url)
        if parts.scheme == "https" and ssl is None:
            raise ValueError("--notify %s: this Python has no ssl module" % url)
        return parts

    def start(self, supervisor):
        self._thread = supervisor.spawn("notifier", self._run)

    def take_no_more(self):
        """A second Ctrl-C: the runs it kills did not fail, and are not said to."""
        self._exiting = True

    def ended(self, session):
        """Called by a run's terminal event (any thread): never blocks."""
        if self._exiting:
            return
        body = _json_line(self.body_for(session)).encode()
        with self._lock:
            if len(self._due) >= NOTIFY_QUEUE_LIMIT:
                self.dropped += 1
                log.warning("--notify: %d notifications waiting; run %s's is dropped",
                            len(self._due), session.id)
                return
            heapq.heappush(self._due, (time.monotonic(), next(self._seq), 1, body))
        self._wake.set()

    def body_for(self, session):
        latest = session.snapshot()
        state = latest["state"]
        body = {"session_id": session.id, "title": session.title, "state": state,
                "params": session.params, "started_ts": session.started_ts,
                "ended_ts": session.ended_ts}
        if state == "complete":
            body["result"] = latest.get("result")
        else:
            body["message"] = latest.get("message") or "the run was %s" % state
        if self.body_format == "slack":
            return {"text": _notify_text(body)}
        return body

    def stats(self):
        with self._lock:
            waiting = len(self._due)
        return {"delivered": self.delivered, "failed": self.failed, "dropped": self.dropped,
                "waiting": waiting}

    def stop(self, timeout=1.0):
        """Shutdown: what is due now still goes, for at most `timeout`."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        while True:
            with self._lock:
                item = self._due[0] if self._due else None
                ready = item is not None and item[0] <= time.monotonic()
                if ready:
                    heapq.heappop(self._due)
            if self._stopping and not ready:
                return
            if not ready:
                self._wake.wait(None if item is None else item[0] - time.monotonic())
                self._wake.clear()
                continue
            _, _, attempt, body = item
            try:
                self._deliver(body)
            except Exception as exc:     # any failure of one delivery: try it again later
                self._retry(attempt, body, exc)
            else:
                self.delivered += 1
                if self._failing:
                    log.warning("--notify: %s answers again", self.shown)
                    self._failing = False

    def _deliver(self, body):
        parts = self._parts
        connection = http.client.HTTPSConnection if parts.scheme == "https" \
            else http.client.HTTPConnection
        conn = connection(parts.hostname, parts.port, timeout=NOTIFY_TIMEOUT_S)
        headers = {"Content-Type": "application/json",
                   "User-Agent": "sse_demo/" + __version__}
        if self.key:
            headers["X-SSE-Demo-Signature"] = "sha256=" + hmac.new(
                self.key.encode(), body, hashlib.sha256).hexdigest()
        # The timeout bounds each wait for a byte; a receiver that trickles
        # its answer would hold this, the only notifier thread, for ever.
        # So the socket is shut at NOTIFY_TIMEOUT_S, which ends any read.
        watchdog = threading.Timer(NOTIFY_TIMEOUT_S, _shut_down, (conn,))
        watchdog.daemon, watchdog.name = True, "notifier-watchdog"
        watchdog.start()
        try:
            conn.request("POST", (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                         body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        finally:
            watchdog.cancel()
            watchdog.join()       # it does not shut a socket that close() gave back
            conn.close()
        if not 200 <= response.status < 300:
            raise OSError("it answered %d" % response.status)

    def _retry(self, attempt, body, exc):
        if not self._failing:
            log.warning("--notify: %s failed (%s); retrying, and logging nothing more until "
                        "it answers", self.shown, exc)
            self._failing = True
        if attempt > len(NOTIFY_RETRIES_S) or self._stopping:
            self.failed += 1
            log.debug("--notify: a notification is given up after %d attempts", attempt)
            return
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + NOTIFY_RETRIES_S[attempt - 1],
                                       next(self._seq), attempt + 1, body))


###############################################################################
# Request parsing
###############################################################################

class _HTTPError(Exception):
    """An error answer: status, a human-readable reason, extra headers, and
    for a bad /start parameter its name (so a form can show the reason next
    to that field)."""

    def __init__(self, status, message, headers=None, param=None, extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param
        self.extra = extra or {}     # more for the JSON body

    def body(self):
        data = dict(self.extra, error=self.message)
        if self.param is not None:
            data["param"] = self.param
        return data


DECIMAL = re.compile(r"[0-9]{1,30}")


def _clamp(value, low, high):
    if low is not None and value < low:
        return low
    if high is not None and value > high:
        return high
    return value


def _convert_json(kind, value):
    """A JSON value as `kind`, or None. True is not an integer and 5.0 is not
    an integer; floats must be finite (json reads 1e999 as infinity)."""
    if kind is float:
        return float(value) if _is_finite_number(value) else None
    return value if type(value) is kind else None


def _convert_text(kind, text):
    """A form or query value as `kind`, or None."""
    if kind is str:
        return text
    if kind is bool:
        return {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if kind is int:
        return int(text) if INTEGER_TEXT.fullmatch(text) else None
    if NUMBER_TEXT.fullmatch(text):
        number = float(text)
        return number if math.isfinite(number) else None
    return None


def _parse_start_params(spec, sources):
    """Validate /start parameters against the job's description. `sources`
    is a list of ([(name, value), ...], from_json): the query's and the
    form's values are text, a JSON body's are JSON values. A parameter the
    client did not give takes its default, brought within its bounds (so
    `iterations=5` alone gives `update_every=5`); one it gave must fit them."""
    params, given = {name: p.default for name, p in spec.params.items()}, set()
    for pairs, from_json in sources:
        for name, value in pairs:
            param = spec.params.get(name)
            if param is None:
                raise _HTTPError(400, "unknown parameter %r; expected %s"
                                 % (name, ", ".join(spec.params) or "none"), param=name)
            if name in given:
                raise _HTTPError(400, "parameter %r given twice" % name, param=name)
            given.add(name)
            value = _convert_json(param.kind, value) if from_json \
                else _convert_text(param.kind, value)
            if value is None:
                raise _HTTPError(400, "%s must be %s" % (name, param.rule_text()), param=name)
            params[name] = value
    for name, param in spec.params.items():
        low, high = param.min, param.highest(params)
        if name not in given:
            params[name] = _clamp(params[name], low, high)
        elif (low is not None and params[name] < low) or (high is not None and params[name] > high):
            raise _HTTPError(400, "%s must be %s" % (name, param.rule_text(params)), param=name)
    spec.check(params)
    return params


def _parse_last_event_id(header, query):
    """The client's last event id: the header wins over `?lastEventId=`; a
    value that is not a plain ASCII decimal number counts as absent."""
    for value in (header, query.get("lastEventId")):
        if value is not None and DECIMAL.fullmatch(value.strip()):
            return int(value.strip())
    return None


def _parse_query(query):
    """`?a=1&b=2` as a dict; a repeated name keeps its first value."""
    result = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        result.setdefault(name, value)
    return result


def _bearer_credential(authorization):
    """The credential of an `Authorization: Bearer <credential>` header, or None."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _host_name(host_header):
    """The host part of a Host header, lowercased: `[::1]:80` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_ip_literal(name):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name)
            return True
        except (OSError, ValueError):
            pass
    return False


HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")   # as _host_name makes it


def _allowed_host_name(name):
    """An --allow-host name as a request's Host header gives it (_host_name):
    lowercased, without the brackets of an IPv6 address or a final dot."""
    name = name.strip().lower()
    return (name[1:-1] if name.startswith("[") and name.endswith("]") else name).rstrip(".")


def _is_allowed_host_name(name):
    """A name a request can carry: a host name, or an IP address."""
    name = _allowed_host_name(name)
    return bool(HOST_NAME.fullmatch(name)) and ".." not in name or _is_ip_literal(name)


###############################################################################
# Access: the operator's token and view keys, when others can reach the server
###############################################################################

TOKEN_COOKIE = "sse_demo_%d"       # the sign-in cookie, named after the server's port: a
                                   # browser sends a host's cookies to every port of it
TOKEN_MIN_BITS = 128               # a given token must be able to hold this much (_check_token)
TOKEN_CHARACTERS = ((r"[a-z]", 26), (r"[A-Z]", 26), (r"[0-9]", 10), (r"[^A-Za-z0-9]", 33))
OPERATOR_TOKEN_BYTES = 32          # a token the server makes: 256 bits, 43 characters
FAILURES_ALLOWED = 10              # failed credentials from one address within a minute;
FAILURE_WINDOW_S = 60.0            # from the next on, it gets 429 for LOCKOUT_S, unless it
LOCKOUT_S = 60.0                   # carries a right credential
ADDRESSES_KEPT = 10000             # past this many, the lock-out forgets quiet addresses
SECRET_NAMES = ("token", "view", "feed")   # query parameters that carry a credential
QUERY = re.compile(r"(?<=\?)\S*")         # a logged request target's query (up to a space)
VIEWABLE_PATH = re.compile(r"/(?:progress|status|series|log|export)/(%s)" % SESSION_ID_PATTERN)
VIEWER_PAGES = ("/", "/job")    # a viewer's page loads these, with its key, before the run
FORWARDED_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)*")   # a path a proxy serves us under


def _check_token(token):
    """Refuse a token too short to hold TOKEN_MIN_BITS: its length times
    the bits of one character of the classes it uses (a-z, A-Z, 0-9, the
    rest of printable ASCII). How it was made the server cannot know; this
    refuses what cannot be strong. Raises ValueError."""
    pool = sum(size for pattern, size in TOKEN_CHARACTERS if re.search(pattern, token))
    bits = len(token) * math.log2(max(pool, 1))
    if bits < TOKEN_MIN_BITS:
        raise ValueError("the token is too weak: %d characters like these hold at most %d "
                         "bits, and a token needs %d; make one with python3 -c 'import "
                         "secrets; print(secrets.token_urlsafe())'"
                         % (len(token), bits, TOKEN_MIN_BITS))


class _Access:
    """The operator's token and a lock-out for addresses that keep failing.
    The token arrives as `Authorization: Bearer <token>` (scripts) or as the
    sign-in cookie that `GET /?token=` sets (browsers); it is compared in
    constant time and never logged.

    The cookie is not the token: a browser sends a host's cookies to every
    port of it. It is an HMAC of the token under the cookie's name (which
    holds the port): only this server takes it, and it cannot be turned
    back into the token or used as one.

    The lock-out never refuses a right credential: anyone who shares the
    operator's address (loopback, a proxy, an SSH tunnel) could otherwise
    keep the operator out with eleven requests a minute. So a locked-out
    guesser still learns which guess is right, and what makes guessing
    hopeless is the token's strength (at least TOKEN_MIN_BITS, checked at
    start; the server's own has 256): at a million guesses a second, 2**128
    takes 10**25 years. The lock-out answers the rest of a failing
    address's requests cheaply, with one warning in the log."""

    def __init__(self, token, port):
        _check_token(token)
        self.token = token
        self.cookie_name = TOKEN_COOKIE % port
        mac = hmac.new(token.encode(), self.cookie_name.encode(), hashlib.sha256).digest()
        self.cookie = base64.urlsafe_b64encode(mac).decode().rstrip("=")
        self._lock = threading.Lock()    # guards _failures, _locked
        self._failures = {}              # address -> deque of monotonic failure times
        self._locked = {}                # address -> monotonic time its lock-out ends

    def holds_token(self, value, cookie=False):
        """Is `value` the token (with `cookie`: the sign-in cookie)?"""
        secret = self.cookie if cookie else self.token
        return value is not None and hmac.compare_digest(value.encode("utf-8", "replace"),
                                                         secret.encode())

    def locked_out(self, address):
        with self._lock:
            return self._locked.get(address, 0.0) > time.monotonic()

    def failed(self, address):
        """Count a wrong or missing credential from `address`. True when the
        address is locked out: from its FAILURES_ALLOWED + 1st failure within
        FAILURE_WINDOW_S on, for LOCKOUT_S (meanwhile nothing more counts)."""
        now = time.monotonic()
        with self._lock:
            if self._locked.get(address, 0.0) > now:
                return True
            recent = self._failures.setdefault(address, collections.deque())
            recent.append(now)
            while recent[0] <= now - FAILURE_WINDOW_S:
                recent.popleft()
            locked = len(recent) > FAILURES_ALLOWED
            if locked:
                self._locked[address] = now + LOCKOUT_S
                del self._failures[address]
            if len(self._failures) + len(self._locked) > ADDRESSES_KEPT:   # forget quiet ones
                self._failures = {a: times for a, times in self._failures.items()
                                  if times[-1] > now - FAILURE_WINDOW_S}
                self._locked = {a: until for a, until in self._locked.items() if until > now}
        if locked:      # the log's I/O after the lock, which every request may need
            log.warning("%s: %d failed credentials within a minute; only a right one is "
                        "taken from it for %d s", address, FAILURES_ALLOWED + 1, LOCKOUT_S)
        return locked


def _without_secrets(text):
    """A request line fit for a log: the value of each query parameter whose
    name, decoded as the server decodes it (`%74oken` is `token`), is a
    credential's shows as ***."""
    def masked(pair):
        name, equals, _ = pair.partition("=")
        secret = equals and urllib.parse.unquote_plus(name).strip().lower() in SECRET_NAMES
        return name + "=***" if secret else pair
    return QUERY.sub(lambda query: "".join(map(masked, re.split(r"([&;])", query.group()))),
                     text)


def _cookie_value(header, name):
    """One cookie's value from a Cookie header, or None."""
    for part in (header or "").split(";"):
        key, equals, value = part.strip().partition("=")
        if equals and key == name:
            return value
    return None


ADDRESS_CHARS = 100      # more than any IP address's text, a scope (fe80::1%eth0) too


@functools.lru_cache(maxsize=1024)
def _normal_address(text):
    """_normal_ip's answer, remembered: every connection asks it of its
    peer's address two or three times, and ipaddress takes 5 to 7 us each
    time (perf put the three at a tenth of the server's work in opening a
    stream). An IPv6 scope (`::1%lo`) is left out: a socket names its peer
    without it, and Python 3.7 and 3.8 do not read one."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0] if ":" in text else text)
    except ValueError:
        return None
    return str(getattr(address, "ipv4_mapped", None) or address)


def _normal_ip(text):
    """An IP address in one spelling, an IPv4-mapped IPv6 address as its IPv4
    (a dual-stack socket sees 127.0.0.1 as ::ffff:127.0.0.1); None when
    `text` is not one (no address is longer than ADDRESS_CHARS: a header's
    64 KB of text is not looked at, nor remembered)."""
    text = text.strip()
    return _normal_address(text) if len(text) <= ADDRESS_CHARS else None


def _public_host(address):
    """A name others can open this server by: the bound address, or this
    machine's name when bound to every address (0.0.0.0 opens nothing)."""
    if address in ("0.0.0.0", "::"):
        return socket.gethostname()
    return "[%s]" % address if ":" in address else address


###############################################################################
# Runs reported from elsewhere: POST /runs and POST /runs/<id>/events
###############################################################################

# A run that another machine reports (`sse_demo.py report`, `Reporter`, or
# curl): the server runs nothing for it; it takes the events the reporter
# posts, checks them as it checks a job's, and serves them like any run's.

REPORT_WATCH_S = 0.5               # how often silent reporters are looked for
REPORT_JOIN_S = 0.25               # past its allowance, a reported run's lines go together
                                   # this often
REPORT_BODY_BYTES = 4 * 2 ** 20    # one batch of events (other requests: MAX_BODY_BYTES)
REPORT_BATCH_EVENTS = 10000        # events in one batch
REPORT_TITLE_LIMIT = 200           # characters of a reported run's title
REPORT_COUNT_LIMIT = 1e15          # a reported done or total: the percent made from it stays
                                   # finite
REPORT_BARS_LIMIT = 8               # nested levels of a reported progress event
REPORT_FIELDS = 100                # fields of a reported progress event
REPORT_EVENT_BYTES = 64 * 1024     # a reported progress event's JSON, or a result (a message
                                   # is cut at LOG_MESSAGE_LIMIT instead): a run's history
                                   # then holds at most 1,000 events of about that
REPORTED_EVENTS = ("progress", "log", "complete", "error", "cancelled")
REPORT_PATH = re.compile(r"/runs/(%s)/events" % SESSION_ID_PATTERN)


def _json_body(body, error):
    """A request body as JSON; raises error("body", reason) when it is not."""
    try:
        return _json_value(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error("body", "not valid JSON: %s" % exc)


class _BadReport(ValueError):
    """A batch the server refuses: its reason, and the field, as
    `events[3].done`."""

    def __init__(self, field, message):
        super().__init__("%s: %s" % (field, message))
        self.field = field


def _check_reported_number(field, value, may_be_none=False):
    if value is None and may_be_none:
        return None
    if not _is_finite_number(value):
        raise _BadReport(field, "must be a finite number%s, not %s"
                         % (" or null" if may_be_none else "", repr(value)[:40]))
    if abs(value) > REPORT_COUNT_LIMIT:
        raise _BadReport(field, "must be at most %g either side of 0" % REPORT_COUNT_LIMIT)
    return value


def _reported_bars(field, bars):
    """[label, done, total] levels from a batch's `bars`."""
    if not isinstance(bars, list) or not 0 < len(bars) <= REPORT_BARS_LIMIT:
        raise _BadReport(field, "must be a list of 1 to %d {label, done, total}"
                         % REPORT_BARS_LIMIT)
    levels = []
    for i, bar in enumerate(bars):
        where = "%s[%d]" % (field, i)
        if not isinstance(bar, dict):
            raise _BadReport(where, "must be an object {label, done, total}")
        label = bar.get("label")
        if label is not None and not isinstance(label, str):
            raise _BadReport(where + ".label", "must be a string")
        levels.append([label, _check_reported_number(where + ".done", bar.get("done")),
                       _check_reported_number(where + ".total", bar.get("total"), True)])
    return levels


def _reported_progress(where, fields):
    """A reported progress event's data, checked whole: what the server
    makes of it (the percent, the whole run of nested bars) must be
    strict JSON too, so that a batch that passes never fails to publish."""
    stage = fields.pop("stage", None)
    if stage is not None and not isinstance(stage, str):
        raise _BadReport(where + ".stage", "must be a string")
    done = fields.pop("done", fields.pop("iteration", None))
    total = fields.pop("total", None)
    bars = fields.pop("bars", None)
    clash = sorted(RESERVED_FIELDS.intersection(fields))
    if clash:
        raise _BadReport("%s.%s" % (where, clash[0]), "is a name the server sets")
    if len(fields) > REPORT_FIELDS:
        raise _BadReport(where, "has %d fields: at most %d" % (len(fields), REPORT_FIELDS))
    if bars is not None:
        data = _progress_data(None, stage=stage, bars=_reported_bars(where + ".bars", bars),
                              fields=fields)
    else:
        data = _progress_data(_check_reported_number(where + ".done", done),
                              _check_reported_number(where + ".total", total, True), stage,
                              fields=fields)
    for name in ("iteration", "total", "percent"):
        if data.get(name) is not None and not _is_finite_number(data[name]):
            raise _BadReport("%s.%s" % (where, "bars" if bars is not None else "total"),
                             "makes the run's %s %r, not a finite number" % (name, data[name]))
    return data


def _reported_call(index, item):
    """One event of a batch as what will be published: (name, data) for a
    progress or log event, its data made as a job's are; (state, fields)
    for the run's end. Raises BadReport naming the field."""
    where = "events[%d]" % index
    if not isinstance(item, dict):
        raise _BadReport(where, "must be an object with an `event`")
    name = item.get("event")
    if name not in REPORTED_EVENTS:
        raise _BadReport(where + ".event", "must be one of %s" % ", ".join(REPORTED_EVENTS))
    fields = {k: v for k, v in item.items() if k != "event"}
    if name == "progress":
        return name, _reported_progress(where, fields)
    if name == "log":
        message, level = fields.pop("message", None), fields.pop("level", "info")
        stream = fields.pop("stream", None)
        if not isinstance(message, str):
            raise _BadReport(where + ".message", "must be a string")
        if level not in LOG_LEVELS:
            raise _BadReport(where + ".level", "must be one of %s" % ", ".join(LOG_LEVELS))
        if stream not in (None, "stdout", "stderr"):
            raise _BadReport(where + ".stream", "must be stdout or stderr")
        if fields:
            raise _BadReport("%s.%s" % (where, sorted(fields)[0]), "is not a field of a log event")
        return name, _log_data(message, level, **({"stream": stream} if stream else {}))
    if name == "error" and not isinstance(fields.get("message"), str):
        raise _BadReport(where + ".message", "must be a string: what went wrong")
    if name == "error" and "exit_code" in fields and type(fields["exit_code"]) is not int:
        raise _BadReport(where + ".exit_code", "must be an integer")
    for text in ("signal", "reason"):
        if name == "error" and text in fields and not isinstance(fields[text], str):
            raise _BadReport("%s.%s" % (where, text), "must be a string")
    unknown = sorted(set(fields) - (set(END_FIELDS) | {"message"} if name == "error"
                                    else {"result", "message"}))
    if unknown:
        raise _BadReport("%s.%s" % (where, unknown[0]), "is not a field of a %s event" % name)
    if isinstance(fields.get("message"), str):
        fields["message"] = _log_data(fields["message"], "error")["message"]
    return name, fields


def _parse_report(body):
    """(seq or None, [(name, data), ...]) from a POST /runs/<id>/events
    body: {"seq": N, "events": [...]}, every event checked, as it will be
    published, before any is taken. Raises BadReport."""
    data = _json_body(body, _BadReport)
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise _BadReport("events", 'send {"events": [...]}: a list of events')
    seq = data.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise _BadReport("seq", "must be a whole number: how many events came before")
    items = data["events"]
    if len(items) > REPORT_BATCH_EVENTS:
        raise _BadReport("events", "at most %d in one batch" % REPORT_BATCH_EVENTS)
    calls = [_reported_call(i, item) for i, item in enumerate(items)]
    for i, call in enumerate(calls[:-1]):
        if call[0] in TERMINAL_STATES:
            raise _BadReport("events[%d]" % (i + 1), "comes after the run's end")
    for i, (name, fields) in enumerate(calls):
        try:
            size = len(_json_line(fields))
        except (TypeError, ValueError) as exc:
            raise _BadReport("events[%d]" % i, "not strict JSON: %s" % exc)
        if size > REPORT_EVENT_BYTES and (name == "progress" or "result" in fields):
            raise _BadReport("events[%d]" % i, "is %d bytes: at most %d (send a long text "
                             "as a message, which is cut instead)" % (size, REPORT_EVENT_BYTES))
    return seq, calls


def _parse_open_report(body):
    """(title, params) from a POST /runs body: {"title": "...", "params":
    {...}}, both optional. Raises BadReport."""
    if not body:
        return None, {}
    data = _json_body(body, _BadReport)
    if not isinstance(data, dict):
        raise _BadReport("body", "must be a JSON object")
    title, params = data.get("title"), data.get("params", {})
    if title is not None and (not isinstance(title, str) or not title.strip()
                              or len(title) > REPORT_TITLE_LIMIT):
        raise _BadReport("title", "must be a string of 1 to %d characters" % REPORT_TITLE_LIMIT)
    if not isinstance(params, dict) or any(
            isinstance(v, (dict, list)) for v in params.values()):
        raise _BadReport("params", "must be an object of plain values (shown with the run)")
    try:
        _json_line(params)
    except ValueError as exc:
        raise _BadReport("params", "not strict JSON: %s" % exc)
    return title, params


class _Allowance:
    """How many events a run may publish one by one: OUTPUT_BURST_LINES at
    once, refilled at OUTPUT_LINES_PER_S, so that a flood stays well inside
    the history and the shared queues (journal, Pushpin). The caller
    serialises its calls."""

    def __init__(self):
        self.left = OUTPUT_BURST_LINES
        self.refilled = time.monotonic()

    def take(self, wanted):
        """How many of `wanted` events may go one by one now."""
        now = time.monotonic()
        self.left = min(OUTPUT_BURST_LINES, self.left + (now - self.refilled) * OUTPUT_LINES_PER_S)
        self.refilled = now
        allowed = min(wanted, int(self.left))
        self.left -= allowed
        return allowed


def _joined_logs(items):
    """Log events' data as few events: their lines in order, in messages of
    at most LOG_MESSAGE_LIMIT characters, each with its most severe level."""
    pieces, piece, size = [], [], 0
    for item in items:
        if piece and size + len(item["message"]) > LOG_MESSAGE_LIMIT:
            pieces.append(piece)
            piece, size = [], 0
        piece.append(item)
        size += len(item["message"]) + 1
    for piece in pieces + [piece]:
        data = {"message": "\n".join(item["message"] for item in piece),
                "level": max((item["level"] for item in piece), key=LOG_LEVELS.index)}
        streams = {item.get("stream") for item in piece}
        if len(streams) == 1 and None not in streams:
            data["stream"] = streams.pop()
        yield data


class _Reported:
    """What the server knows of one reported run besides its session: how
    many events it has taken (a batch sent again after a lost answer is
    not taken twice), when it last heard, and its allowance: a reporter
    that floods gets what a flooding --cmd program gets."""

    def __init__(self, session, timeout_s, received=0, on_received=None):
        self.session = session
        self.on_received = on_received   # the journal keeps the count
        self.lock = threading.Lock()     # one batch at a time, in order
        self.received = received
        self.allowance = _Allowance()
        self.held, self.latest = [], None  # past the allowance: log lines, progress waiting
        self.flushed = time.monotonic()
        self.timeout_s = timeout_s
        self.heard = time.monotonic()

    def take(self, seq, calls):
        """Publish the batch's events that are new, in order. Returns how
        many events the run has taken in all, or None when it has ended
        and there were new ones (cancelled on the page, or silent too long).
        A `seq` past the count is 409 with the count: the reporter sends
        again from there (a server that crashed lost the end of what it had
        taken, and its journal says how much it kept)."""
        with self.lock:
            self.heard = time.monotonic()
            if seq is not None:
                if seq > self.received:
                    raise _HTTPError(409, "events are missing before this batch: the server "
                                     "has %d, the batch starts at %d" % (self.received, seq),
                                     extra={"received": self.received})
                calls = calls[self.received - seq:]
            if calls and self.session.terminal_id is not None:
                return None
            self._publish(calls)
            self.received += len(calls)
            if calls and self.on_received is not None:
                self.on_received(self.session, self.received)
            return self.received

    def _publish(self, calls):
        """Publish what the allowance lets go one by one; past it, the run's
        log lines wait and go together, and only its latest progress
        (progress is state, and it brings the latest value of each field the
        others had), at most every REPORT_JOIN_S: a reporter that floods
        costs few events, however it splits its batches."""
        for name, data in calls:
            if name in TERMINAL_STATES:
                self.flush()
                _end_run(self.session, name, data)
            elif not self.held and self.latest is None and self.allowance.take(1):
                self.session.publish(name, data)
            elif name == "log":
                self.held.append(data)
            else:
                self.latest = _latest_after(self.latest or {}, data)
        if time.monotonic() - self.flushed >= REPORT_JOIN_S:
            self.flush()

    def flush(self):
        """Publish what waits (the reporter watch calls it too: a reporter
        that goes quiet after a flood still has its lines shown)."""
        held, latest, self.held, self.latest = self.held, self.latest, [], None
        self.flushed = time.monotonic()
        for data in _joined_logs(held) if held else ():
            self.session.publish("log", data)
        if latest is not None:
            self.session.publish("progress", latest)

    def silent_for(self, now):
        return now - self.heard


class _ReportedRuns(_RunListener):
    """Every reported run that goes on, and the thread that ends one whose
    reporter has gone silent for --report-timeout."""

    def __init__(self, timeout_s, on_received=None):
        self.timeout_s = timeout_s
        self.on_received = on_received
        self._runs = {}                  # session id -> _Reported
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self, supervisor):
        self._thread = supervisor.spawn("reporter watch", self._run)

    def add(self, session, received=0):
        reported = _Reported(session, self.timeout_s, received, self.on_received)
        with self._lock:
            self._runs[session.id] = reported
        return reported

    def get(self, session_id):
        with self._lock:
            return self._runs.get(session_id)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def _run(self):
        while not self._stop.wait(REPORT_WATCH_S):
            self.end_silent(time.monotonic())

    def forgotten(self, session):
        with self._lock:
            self._runs.pop(session.id, None)

    def end_silent(self, now):
        """End each run whose reporter has said nothing for its timeout;
        publish what waits past a flooding reporter's allowance."""
        with self._lock:
            going = [reported for reported in self._runs.values()
                     if reported.session.terminal_id is None]
        for reported in going:
            if reported.held or reported.latest is not None:
                with reported.lock:
                    reported.flush()
        silent = [reported for reported in going if reported.silent_for(now) > reported.timeout_s]
        for reported in silent:
            log.warning("run %s: its reporter went silent", reported.session.id)
            _end_run(reported.session, "error", {
                "message": "the reporter went silent: nothing heard for %g s "
                           "(--report-timeout)" % reported.timeout_s})


###############################################################################
# The HTTP handler
###############################################################################

class _Gate:
    """Every access decision about a request, in one place, so that the
    handler only speaks HTTP: its Host (DNS rebinding), its Origin (a POST
    from another site's page), and behind a token its credential: the
    operator's token or sign-in cookie, a view key where it reaches, the runs
    feed's key for Pushpin, a run's own control or report key (its route
    checks which); the lock-out, and the client's address that it counts."""

    ALLOW, SIGN_IN = "allow", "sign in"

    def __init__(self, server):
        self.server = server
        self.access = server.access      # None: no token, every path open

    def admit(self, request, path, query):
        """ALLOW; SIGN_IN (a right ?token= on the page: set the cookie); 401
        or 429 for the page itself (which then offers a sign-in, or says why
        not); or raises HTTPError: 400 or 403 for its Host, 401, 403 or 429
        for its credential."""
        self._check_host(request)
        access = self.access
        if access is None or path == "/healthz":    # counts only: open even when locked out
            return self.ALLOW
        given = _parse_query(query)
        page = path == "/" and request.command in ("GET", "HEAD")
        offered = given.get("token") or None if page else None    # ?token= is none
        if offered is not None and access.holds_token(offered):
            return self.SIGN_IN
        if offered is None and self.operator(request):
            return self.ALLOW
        if (path.startswith("/cancel/") or REPORT_PATH.fullmatch(path)) and \
                request.headers.get("Authorization"):
            return self.ALLOW     # perhaps the run's control or report key: the route decides
        view_key, feed_key = given.get("view"), given.get("feed")
        if view_key is not None and self._viewer_admitted(request, path, view_key):
            return self.ALLOW
        if path == "/runs/events" and feed_key is not None and hmac.compare_digest(
                feed_key.encode("utf-8", "replace"), self.server.feed.key.encode()):
            return self.ALLOW     # Pushpin's own request for the runs list it holds
        # The page, or the job it loads first, asked for with no credential
        # at all: how a sign-in begins, not a guess, so not counted.
        quiet = path in VIEWER_PAGES and request.command in ("GET", "HEAD") and not (
            offered or view_key or request.headers.get("Authorization") or self._cookie(request))
        address = self.client_ip(request)
        locked = access.locked_out(address) if quiet else access.failed(address)
        if page:
            return 429 if locked else 401
        self.refuse(request, 401, "this server needs a sign-in: send Authorization: Bearer "
                    "<token>, or open /?token=<token> in a browser",
                    {"WWW-Authenticate": 'Bearer realm="sse_demo"'}, locked)

    def refuse(self, request, status, message, headers=None, locked=None):
        """Refuse a wrong or missing credential: 429 while the client's
        address is locked out (`locked`; None: count this failure first)."""
        if locked is None:
            locked = self.access is not None and self.access.failed(self.client_ip(request))
        if locked:
            raise _HTTPError(429, "too many failed credentials from this address: for a "
                             "minute only a right one is taken",
                             {"Retry-After": str(int(LOCKOUT_S))})
        raise _HTTPError(status, message, headers)

    def run_for_key(self, request, session_id, holds_key, refusal):
        """The run, once the request's Bearer key for it is one `holds_key`
        takes. These paths let any Authorization header past the access
        check, so behind a token a wrong key, or a run that is not there,
        counts as a failed credential, as a wrong token does elsewhere."""
        session = self.server.registry.get(session_id)
        if session is not None and holds_key(session, _bearer_credential(
                request.headers.get("Authorization"))):
            return session
        if session is None:
            status, refusal = 404, "unknown session (it may have expired)"
        else:
            status = 403
        if self.operator(request):
            raise _HTTPError(status, refusal)
        self.refuse(request, status, refusal)

    def operator(self, request):
        """Does the request carry the operator's token (header or cookie)?
        Without a token there is no operator: a run's control key alone
        cancels it."""
        access = self.access
        if access is None:
            return False
        if access.holds_token(_bearer_credential(request.headers.get("Authorization"))):
            return True
        return access.holds_token(self._cookie(request), cookie=True)

    def sign_in_headers(self, request):
        """The token was right: the sign-in cookie (see _Access) for the path
        the server is served under (/, or behind a proxy, its path), and the
        page there to go to, so the token leaves the address bar and the
        history. `Secure` under TLS, ours or a proxy's."""
        prefix = self.forwarded_prefix(request)
        secure = self.server.tls or \
            (request.headers.get("X-Forwarded-Proto") or "").strip().lower() == "https"
        return {"Location": prefix + "/", "Cache-Control": "no-store",
                "Set-Cookie": "%s=%s; HttpOnly; SameSite=Strict; Path=%s%s"
                              % (self.access.cookie_name, self.access.cookie, prefix or "/",
                                 "; Secure" if secure else "")}

    def forwarded_prefix(self, request):
        """The path a reverse proxy serves this server under, from its
        X-Forwarded-Prefix (nginx: `proxy_set_header X-Forwarded-Prefix
        /jobs;`), else --base-path, else "". Only a plain path is taken: a
        redirect built from it stays on this site, whoever sent the header."""
        prefix = (request.headers.get("X-Forwarded-Prefix") or "").rstrip("/")
        return prefix if prefix and FORWARDED_PREFIX.fullmatch(prefix) else self.server.base_path

    def check_origin(self, request):
        """Cross-site request protection: a browser names the page that sent a
        POST; only the server's own page may start or cancel a run."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        host = (request.headers.get("Host") or "").strip().lower()
        if origin.strip().lower() not in ("http://" + host, "https://" + host):
            raise _HTTPError(403, "cross-origin request from %r refused" % origin)

    def check_grip_signature(self, request):
        """With a key configured, a request that claims to come through
        Pushpin must carry a valid Grip-Sig."""
        key = self.server.options.grip_key
        if key and not _grip_signature_valid(request.headers.get("Grip-Sig"), key):
            raise _HTTPError(403, "invalid Grip-Sig")

    def client_ip(self, request):
        """The client's address, which the lock-out counts: the peer's; or,
        when the peer is a proxy the server trusts (a --trusted-proxy
        address, or Pushpin proving itself with a Grip-Sig that --grip-key
        verifies), the address that proxy put last in X-Forwarded-For.
        Anyone else's X-Forwarded-For is ignored: a client cannot pick the
        address its failures count against."""
        peer = _normal_ip(request.client_address[0]) or request.client_address[0]
        # Several header lines are one list, in order (RFC 9110, section 5.3):
        # a proxy that adds a line of its own (HAProxy) adds it last.
        headers, key = request.headers, self.server.options.grip_key
        forwarded = _normal_ip(",".join(headers.get_all("X-Forwarded-For") or []).split(",")[-1])
        if forwarded and (peer in self.server.trusted_proxies or (
                key and "Grip-Sig" in headers and _grip_signature_valid(headers["Grip-Sig"], key))):
            return forwarded
        return peer

    def _check_host(self, request):
        """DNS-rebinding protection: a hostile page that points its own name at
        127.0.0.1 still sends its own name as Host."""
        hosts = request.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise _HTTPError(400, "more than one Host header")
        if not hosts:
            if request.request_version == "HTTP/1.0":
                return
            raise _HTTPError(400, "missing Host header (RFC 9112, section 3.2)")
        if not self.server.host_allowed(_host_name(hosts[0])):
            raise _HTTPError(403, "host %r is not allowed; start the server with "
                             "--allow-host to serve it" % _host_name(hosts[0]))

    def _viewer_admitted(self, request, path, key):
        """A view key lets its holder watch its own run and load the page:
        True there; 403 for a right key on any other path or run; False
        (a failure, answered 401) for a key that is no run's."""
        registry, reading = self.server.registry, request.command in ("GET", "HEAD")
        match = VIEWABLE_PATH.fullmatch(path)
        if match and reading:
            session = registry.get(match.group(1))
            if session is not None and session.holds_view_key(key):
                return True
        if registry.viewed_by(key) is None:
            return False
        if path in VIEWER_PAGES and reading:
            return True
        raise _HTTPError(403, "a view key watches its own run only (this is another run, or "
                         "not watching); the rest needs the operator's token")

    def _cookie(self, request):
        """The sign-in cookie's value, or None. An HTTP/2 proxy may pass the
        cookies as several Cookie lines (RFC 9113, section 8.2.3)."""
        return _cookie_value("; ".join(request.headers.get_all("Cookie") or []),
                             self.access.cookie_name)


class _DeadlineReader(io.RawIOBase):
    """Reads a request from the socket under one deadline for the whole of it,
    so a client that trickles one byte a second is cut off (slowloris); a
    per-read timeout alone would never fire. It holds the socket, not the
    handler: a cycle between the two would keep every request (its body
    too) in memory until a full garbage collection, which a served process
    makes rare (_tune_garbage_collector)."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = 0.0     # monotonic; the handler sets it for each request
        self.waiting = True     # False: take only what has arrived (see _Handler.handle)
        self.ended = False      # the client has closed its side: end of file while waiting

    def readable(self):
        return True

    def readinto(self, buffer):
        sock = self.sock
        if not self.waiting:
            sock.settimeout(0.0)
            try:
                return sock.recv_into(buffer)
            except WOULD_BLOCK:
                return None     # nothing yet; BufferedReader.peek then gives b""
            finally:
                sock.settimeout(WRITE_TIMEOUT_S)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("request not received in time")
        sock.settimeout(remaining)
        try:
            count = sock.recv_into(buffer)
        finally:
            sock.settimeout(WRITE_TIMEOUT_S)
        if not count:
            self.ended = True
        return count


HANDED_TO_HUB = threading.local()  # .sock: the TLS connection this handler thread gave the hub
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


class _HTTPExchange(http.server.BaseHTTPRequestHandler):
    """A connection's life, and HTTP as the server speaks it: each request
    under one deadline (a TLS handshake too), keep-alive between requests
    in the hub rather than in a thread, the socket handed to the hub for a
    stream, a body read only when a route asks for it, and every answer
    (errors too) with a JSON or given body. `_Handler` adds the routes."""

    protocol_version = "HTTP/1.1"
    # Errors about a request line too broken to carry a version still get a
    # status line and headers (the base class would answer those as HTTP/0.9).
    default_request_version = "HTTP/1.0"
    server_version = "sse_demo/" + __version__
    disable_nagle_algorithm = True     # an event is small and must leave at once

    request_read = False    # the whole request, body included, has been read
    responded = False       # a response head has gone out

    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection))
        self.renew_deadline()
        self.connection.settimeout(WRITE_TIMEOUT_S)

    def renew_deadline(self):
        """A request (a TLS handshake too) must arrive within --request-timeout."""
        self.deadline = self.rfile.raw.deadline = time.monotonic() + self.server.options.request_timeout_s

    def handle(self):
        """Answer requests until the connection closes. Between requests a
        keep-alive connection waits in the hub, not in this thread: browsers
        and proxies keep idle connections open, and none of them needs a
        thread while it is quiet."""
        self.close_connection = True
        if _is_tls(self.connection) and not self.finish_handshake():
            return
        self.handle_one_request()
        while not self.close_connection:
            if self.next_request_arrived():
                self.handle_one_request()
            else:
                self.park()

    def finish_handshake(self):
        """A new TLS connection's handshake, under the request deadline: a
        client that stalls or trickles it holds this thread no longer than
        --request-timeout, and no other client waits for it (each connection
        has its own thread). A connection back from the hub has done it
        already: do_handshake() then returns at once."""
        sock = self.connection
        sock.setblocking(False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ)
                while True:
                    try:
                        sock.do_handshake()
                        return True
                    except ssl.SSLWantReadError:
                        selector.modify(sock, selectors.EVENT_READ)
                    except ssl.SSLWantWriteError:
                        selector.modify(sock, selectors.EVENT_WRITE)
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0 or not selector.select(remaining):
                        log.debug("TLS handshake with %s not finished in time",
                                  self.client_address[0])
                        return False
        except (OSError, ValueError) as exc:     # ssl.SSLError is an OSError
            log.debug("TLS handshake with %s failed: %s", self.client_address[0], exc)
            return False
        finally:
            if sock.fileno() != -1:
                sock.settimeout(WRITE_TIMEOUT_S)

    def next_request_arrived(self):
        """Are bytes of the next request already here (read ahead into the
        buffer, or waiting on the socket)? Never blocks. (Waiting a little
        for them would save the next request a new thread, but a thread
        that waits holds its place in --max-per-address, and answers on
        after a shutdown has begun: measured, and left out.)"""
        raw = self.rfile.raw
        raw.waiting = False
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False    # the hub notices a broken connection too
        finally:
            raw.waiting = True

    def park(self):
        """Give the quiet connection to the hub, which hands it back to the
        HTTP server (a new thread) when its next request arrives."""
        self.close_connection = True
        self.server.hub.park(self.take_connection(), self.client_address)

    def handle_one_request(self):
        self.renew_deadline()
        self.request_read = self.responded = False
        super().handle_one_request()

    def parse_request(self):
        """The base class takes a head that the end of the connection cut
        short for a whole one (http.client.parse_headers stops at the end
        of file as at the blank line): a POST /start whose client went away
        mid-head would start a run. That is a 400, and nothing is done."""
        if not super().parse_request():
            return False
        if self.rfile.raw.ended:
            self.send_error(400, "the request head was cut short by the end of the connection")
            return False
        return True

    def take_connection(self):
        """The connection, non-blocking, for the hub: the HTTP server lets go
        of it. A plain socket leaves the server's socket object (which then
        closes nothing); a TLS socket carries its session, so it stays whole
        and this thread is marked as having handed it on, so that it does not
        close it on its way out (SSEServer.shutdown_request). The mark is the
        thread's, not the socket's: the hub may hand the socket back to a new
        thread before this one has finished."""
        if _is_tls(self.connection):
            sock = self.connection
            HANDED_TO_HUB.sock = sock
        else:
            sock = socket.socket(fileno=self.connection.detach())
        sock.setblocking(False)
        return sock

    def read_body(self, limit=MAX_BODY_BYTES):
        """The request body (at most `limit` bytes), read under the request
        deadline, by a route once it has checked what it can without it (a
        key, the run): a body no route wants is never read (the connection
        then closes). No Content-Length means no body."""
        if self.headers.get("Transfer-Encoding"):
            raise _HTTPError(411, "send the body with a Content-Length, not chunked")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self.request_read = True
            return b""
        if len(set(lengths)) > 1 or not DECIMAL.fullmatch(lengths[0].strip()):
            raise _HTTPError(400, "Content-Length must be one non-negative integer")
        length = int(lengths[0])
        if length > limit:
            raise _HTTPError(413, "request body over %d bytes" % limit)
        try:
            body = self.rfile.read(length)
        except socket.timeout:
            raise _HTTPError(408, "request body not received in time")
        if len(body) < length:
            raise _HTTPError(400, "request body shorter than its Content-Length")
        self.request_read = True
        return body

    def open_stream(self, session, last_id):
        """Write the response head and `retry:`, then take the socket from the
        HTTP server so the hub can write the stream."""
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")   # nginx: do not buffer the stream
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(_encode_chunk(RETRY) if chunked else RETRY)
        keep_alive = chunked and not self.close_connection
        self.close_connection = True   # this thread is done with the connection
        # A pipelined request already in rfile's buffer would be lost here;
        # HTTP clients do not pipeline behind a stream.
        return _Connection(self.take_connection(), self.client_address, session, last_id,
                           chunked, keep_alive)

    def send_record(self, session, content_type, filename, convert, follow=False):
        """The run's whole record, each export line through `convert`, as a
        chunked attachment: from the journal file for a run read back after a
        restart, else from memory; with `follow`, until the run ends or the
        client has gone: a quiet run writes nothing a closed socket could
        fail, so it looks once a keepalive interval."""
        self.responded = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Disposition", 'attachment; filename="%s"' % filename)
        self.send_header("Cache-Control", "no-store")
        chunked = self.request_version != "HTTP/1.0"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        frame = _encode_chunk if chunked else (lambda data: data)
        position = 0
        while True:
            lines, position = session.record_lines(position)
            batch, size = [], 0
            for line in lines:       # in pieces: a journal's file can be larger than memory
                piece = convert(line)
                batch.append(piece)
                size += len(piece)
                if size >= RECORD_PIECE_BYTES:
                    self.wfile.write(frame(b"".join(batch)))
                    batch, size = [], 0
            if size:
                self.wfile.write(frame(b"".join(batch)))
            if not follow or session.record_ended(position) or self.server.stopping:
                break
            session.wait_for_record(position, self.server.hub.keepalive_s)
            if self.client_gone():
                log.debug("log follower %s went away", self.client_address[0])
                return
        if chunked:
            self.wfile.write(LAST_CHUNK)

    def client_gone(self):
        """Has the client closed the connection (end of file, or a reset)?
        Bytes it sent meanwhile are read and dropped, or they would hide
        its end of file; the connection then closes after this answer."""
        sock = self.connection
        sock.settimeout(0.0)
        try:
            data = sock.recv(65536)
        except WOULD_BLOCK:
            return False
        except OSError:
            data = b""
        finally:
            sock.settimeout(WRITE_TIMEOUT_S)
        self.close_connection = True
        return not data

    def body_params(self, body):
        """(name, value) pairs from a JSON object or a URL-encoded form."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                data = _json_value(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise _HTTPError(400, "the body is not valid JSON: %s" % exc)
            if not isinstance(data, dict):
                raise _HTTPError(400, "the JSON body must be an object")
            return list(data.items()), True
        if ctype == "application/x-www-form-urlencoded":
            try:
                text = body.decode("ascii")
            except UnicodeDecodeError:
                raise _HTTPError(400, "a URL-encoded body must be ASCII")
            return urllib.parse.parse_qsl(text, keep_blank_values=True), False
        raise _HTTPError(415, "send application/json or application/x-www-form-urlencoded")

    def send_json(self, status, data, headers=None):
        extra = {"Cache-Control": "no-store"}
        extra.update(headers or {})
        self.send_body(status, _json_line(data).encode() + b"\n", "application/json", extra)

    def send_body(self, status, body, content_type, headers=None):
        self.responded = True
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        if not self.request_read:
            self.send_header("Connection", "close")   # an unread body is still on the wire
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None, headers=None):
        """Every error, the base class's own 400/414/431/501 included, is JSON."""
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        self.send_json(code, {"error": message}, headers)

    def version_string(self):
        return self.server_version

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def log_message(self, format, *args):
        """An access-log line (a reporter's posts, several a second, at debug)."""
        level = logging.DEBUG if REPORT_PATH.search(getattr(self, "path", "")) and \
            self.command == "POST" else logging.INFO
        log.log(level, "%s - - [%s] %s", self.address_string(), self.log_date_time_string(),
                _without_secrets(format % args))


class _Handler(_HTTPExchange):
    """Answers every path in PROTOCOL.md, as the routes below say; a
    stream's socket goes to the hub once its response head is written."""

    ROUTES = (
        (re.compile(r"/"), {"GET": "page", "HEAD": "page"}),
        (re.compile(r"/start"), {"POST": "start"}),
        (re.compile(r"/progress/(%s)" % SESSION_ID_PATTERN), {"GET": "stream"}),
        (re.compile(r"/cancel/(%s)" % SESSION_ID_PATTERN), {"POST": "cancel"}),
        (re.compile(r"/status/(%s)" % SESSION_ID_PATTERN), {"GET": "status", "HEAD": "status"}),
        (re.compile(r"/job"), {"GET": "job", "HEAD": "job"}),
        (re.compile(r"/runs"), {"GET": "runs", "HEAD": "runs", "POST": "open_reported"}),
        (re.compile(r"/runs/events"), {"GET": "runs_events"}),
        (REPORT_PATH, {"POST": "report"}),
        (re.compile(r"/series/(%s)" % SESSION_ID_PATTERN), {"GET": "series", "HEAD": "series"}),
        (re.compile(r"/log/(%s)" % SESSION_ID_PATTERN), {"GET": "log"}),
        (re.compile(r"/export/(%s)" % SESSION_ID_PATTERN), {"GET": "export"}),
        (re.compile(r"/healthz"), {"GET": "healthz", "HEAD": "healthz"}),
    )

    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- dispatch ----------------------------------------------------------

    def dispatch(self):
        # A request without a body is read whole once its head is: its
        # connection stays open for the next. A body no route reads is left
        # on the wire, and its connection closes (see send_body).
        self.request_read = not self.headers.get("Transfer-Encoding") and all(
            length.strip() == "0" for length in self.headers.get_all("Content-Length") or [])
        try:
            if len(self.requestline.split()) == 2:
                raise _HTTPError(400, "HTTP/0.9 requests are not supported")
            path, _, query = self.path.partition("?")
            verdict = self.server.gate.admit(self, path, query)
            if verdict is _Gate.SIGN_IN:
                return self.send_body(303, b"", None, self.server.gate.sign_in_headers(self))
            if verdict is not _Gate.ALLOW:
                return self.send_sign_in_page(verdict)
            method, args = self.route(path)
            if self.command == "POST":
                self.server.gate.check_origin(self)
            if self.command == "OPTIONS":
                self.send_body(204, b"", None, {"Allow": self.allow})
            else:
                method(query, *args)
        except _HTTPError as exc:
            self.send_json(exc.status, exc.body(), exc.headers)
        except BadParam as exc:
            self.send_json(400, {"error": str(exc), "param": exc.param})
        except _TooBusy as exc:
            self.send_json(exc.status, {"error": str(exc)}, {"Retry-After": str(RETRY_AFTER_S)})
        except CLIENT_GONE as exc:
            log.debug("client %s went away: %r", self.client_address[0], exc)
            self.close_connection = True
        except Exception:
            log.exception("error answering %r", _without_secrets(self.requestline))
            if self.responded:
                self.close_connection = True
            else:
                self.send_error(500, "internal server error; see the server log")

    def route(self, path):
        for pattern, methods in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                self.allow = ", ".join(sorted(methods) + ["OPTIONS"])
                if self.command == "OPTIONS":
                    return None, ()
                if self.command not in methods:
                    raise _HTTPError(405, "%s is not allowed on %s" % (self.command, path),
                                     {"Allow": self.allow})
                return getattr(self, "route_" + methods[self.command]), match.groups()
        raise _HTTPError(404, "not found")

    def send_sign_in_page(self, status):
        """The page, 401 (it finds /job refused and offers a sign-in form) or
        429 while the address is locked out (it says so)."""
        self.send_body(status, self.server.page or b"sign in", "text/html; charset=utf-8", dict(
            {"Content-Security-Policy": self.server.page_csp, "Cache-Control": "no-store"},
            **({"Retry-After": str(int(LOCKOUT_S))} if status == 429
               else {"WWW-Authenticate": 'Bearer realm="sse_demo"'})))

    def is_operator(self):
        return self.server.gate.operator(self)

    # -- routes ---------------------------------------------------------------

    def route_page(self, query):
        page = self.server.page
        if page is None:
            raise _HTTPError(500, "index.html is missing next to sse_demo.py")
        self.send_body(200, page, "text/html; charset=utf-8", {
            "Content-Security-Policy": self.server.page_csp, "Cache-Control": "no-cache"})

    def route_start(self, query):
        sources = [(urllib.parse.parse_qsl(query, keep_blank_values=True), False)]
        body = self.read_body()
        if body:
            sources.append(self.body_params(body))
        session = self.server.start_session(_parse_start_params(self.server.job, sources))
        sid = session.id
        self.send_json(201, {"session_id": sid, "stream": "/progress/" + sid,
                             "cancel": "/cancel/" + sid, "status": "/status/" + sid,
                             "control_key": session.control_key, "view_key": session.view_key},
                       {"Location": "/status/" + sid})

    def route_stream(self, query, session_id):
        """A run's stream. A page asks for two more things (PROTOCOL.md, "A
        page's stream"): `runs=1`, the runs list's changes on the same
        connection (a browser has six a server), and `pace=1`, progress
        coalesced to what it can draw."""
        session = self.find_session(session_id)
        given = _parse_query(query)
        feed = self.server.feed.session if given.get("runs") in ("1", "true") else None
        if feed is not None and self.server.access is not None and not self.is_operator():
            raise _HTTPError(403, "the runs list (runs=1) needs the operator's token")
        last_id = session.resume_after(
            _parse_last_event_id(self.headers.get("Last-Event-ID"), given))
        if last_id is None:
            self.send_body(204, b"", None)   # EventSource stops reconnecting on 204
            return
        self.serve_stream(session, last_id,
                          "view=" + session.view_key if self.server.access else None,
                          feed=feed, paced=given.get("pace") in ("1", "true"))

    def serve_stream(self, session, last_id, link_query, path=None, feed=None, paced=False):
        """Stream `session`'s events after `last_id`: held by Pushpin when the
        request came through it (its own later requests carry
        `link_query`; unpaced), else written by the hub; with the runs
        `feed`'s events from now on, `paced` or not."""
        if self.server.grip and "Grip-Sig" in self.headers:    # it came through Pushpin
            self.server.gate.check_grip_signature(self)
            body, headers = _grip_hold(session, last_id, self.server.grip.offered(session),
                                       self.headers.get("Grip-Last"),
                                       self.server.hub.keepalive_s, link_query, path,
                                       runs=feed is not None)
            self.send_body(200, body, "text/event-stream", headers)
            return
        hub = self.server.hub
        hub.reserve(self.connection)
        try:
            sub = self.open_stream(session, last_id)
        except BaseException:
            hub.release()
            raise
        if feed is not None:
            sub.feed, sub.feed_cursor = feed, feed.last_id
        if paced:
            sub.paced_from, sub.paced_until = session.last_id, 0.0
        hub.attach(sub)

    def route_cancel(self, query, session_id):
        session = self.server.gate.run_for_key(
            self, session_id, lambda run, key: run.holds_control_key(key) or self.is_operator(),
            "cancelling a run takes its control key (Authorization: Bearer <control_key>)")
        if session.terminal_id is not None:
            raise _HTTPError(409, "session has already ended (%s)" % session.state)
        session.cancel.set()
        if self.server.queue.withdraw(session) or session.report_key:
            _end_run(session, "cancelled", {})   # it never starts, or runs elsewhere: the
                                                  # reporter hears it in its next answer
        self.send_json(202, session.snapshot())

    def route_open_reported(self, query):
        """A run that another machine reports (see _ReportedRuns): its id and
        keys; the report key posts its events, and nothing else."""
        title, params = self.parse_report(_parse_open_report, may_be_empty=True)
        session = self.server.open_reported_run(title, params)
        sid = session.id
        self.send_json(201, {"session_id": sid, "stream": "/progress/" + sid,
                             "cancel": "/cancel/" + sid, "status": "/status/" + sid,
                             "events": "/runs/%s/events" % sid,
                             "control_key": session.control_key, "view_key": session.view_key,
                             "report_key": session.report_key,
                             "report_timeout_s": self.server.reported.timeout_s},
                       {"Location": "/status/" + sid})

    def route_report(self, query, session_id):
        """A batch of a reported run's events. The answer says whether the
        run goes on: `cancel` is true once it was cancelled (409 when the
        batch had new events for it)."""
        session = self.server.gate.run_for_key(
            self, session_id, _Session.holds_report_key,
            "reporting a run's events takes its report key (Authorization: Bearer <report_key>)")
        seq, calls = self.parse_report(_parse_report, REPORT_BODY_BYTES)
        reported = self.server.reported.get(session_id) or self.server.reported.add(session)
        received = reported.take(seq, calls)
        if session.terminal_id is not None and self.server.journal and received is not None:
            self.server.journal.sync(session)      # the end is on disk before it is answered
        answer = {"state": session.state, "cancel": session.state == "cancelled",
                  "last_event_id": session.last_id}
        if received is None:
            self.send_json(409, dict(answer, error="the run has ended (%s)%s" % (
                session.state, ": stop the job" if answer["cancel"] else "")))
        else:
            self.send_json(200, dict(answer, received=received))

    def parse_report(self, parse, limit=MAX_BODY_BYTES, may_be_empty=False):
        """A reporter's JSON body through `parse`; 400 naming the field."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self.read_body(limit)
        if (body or not may_be_empty) and ctype != "application/json":
            raise _HTTPError(415, "send application/json")
        try:
            return parse(body)
        except _BadReport as exc:
            raise _HTTPError(400, str(exc), param=exc.field)

    def route_status(self, query, session_id):
        session = self.find_session(session_id)
        extras = self.server.run_extras(session, self.is_operator())
        self.send_json(200, dict(session.snapshot(), **extras))

    def route_job(self, query):
        self.send_json(200, self.server.job.describe())

    def route_runs(self, query):
        # Read first: a change of GET /runs/events up to this id is older than the list
        change_id = self.server.feed.session.last_id
        runs = self.server.registry.newest(RUNS_LIMIT)
        operator = self.is_operator()
        self.send_json(200, {"runs": [self.server.describe_run(session, operator)
                                      for session in runs], "operator": operator,
                             "last_change_id": change_id})

    def route_runs_events(self, query):
        """The runs list's changes as they happen (see RunsFeed), for the page's
        runs panel: a stream like a run's, that never ends."""
        feed = self.server.feed.session
        resume = _parse_last_event_id(self.headers.get("Last-Event-ID"), _parse_query(query))
        # A new follower starts now (it reads GET /runs for the present); a
        # returning one gets what it missed.
        self.server.feed.publish_changes()
        last_id = feed.last_id if resume is None else feed.resume_after(resume)
        self.serve_stream(feed, last_id,
                          "feed=" + self.server.feed.key if self.server.access else None,
                          "/runs/events")

    def route_series(self, query, session_id):
        session = self.find_session(session_id)
        points = _parse_query(query).get("points", str(SERIES_POINTS_DEFAULT))
        if not DECIMAL.fullmatch(points) or not \
                SERIES_POINTS_MIN <= int(points) <= SERIES_POINTS_MAX:
            raise _HTTPError(400, "points must be an integer from %d to %d"
                             % (SERIES_POINTS_MIN, SERIES_POINTS_MAX), param="points")
        self.send_json(200, session.series_answer(int(points)))

    def route_export(self, query, session_id):
        session = self.find_session(session_id)
        self.send_record(session, "application/x-ndjson", session_id + ".jsonl",
                         lambda line: line)

    def route_log(self, query, session_id):
        """Every log line (CONTRACT.md: log events only; the page says where
        the rest is); with ?follow=1 the answer stays open (chunked) and
        grows until the run ends. A follower holds this thread, as a
        download does: it is for `curl -N`, not for the page. It counts as
        a stream (503 past --max-streams), and holds its thread no longer
        than its client is there (see send_record). The writer does not
        take followers as it takes streams: their lines are made one by
        one from the record (from the journal's file after a restart), work
        and disk reads that would hold up every stream, and a text body
        has no keepalive for it to send."""
        session = self.find_session(session_id)
        follow = _parse_query(query).get("follow") in ("1", "true")
        if follow:
            self.server.hub.reserve(self.connection)
        try:
            self.send_record(session, "text/plain; charset=utf-8", session_id + ".log",
                             lambda line: _log_text_line(json.loads(line))
                             if LOG_TEXT_EVENTS.match(line) else b"", follow)
        finally:
            if follow:
                self.server.hub.release()

    def route_healthz(self, query):
        health = self.server.health()
        self.send_json(200 if health["ok"] else 503, health)

    def find_session(self, session_id):
        session = self.server.registry.get(session_id)
        if session is None:
            raise _HTTPError(404, "unknown session (it may have expired)")
        return session



###############################################################################
# The terminal client: `sse_demo.py watch URL` and `sse_demo.py start URL`
###############################################################################

WATCH_EXIT = {"complete": 0, "error": 1, "cancelled": 3,   # and 2: bad usage, unreachable
              "exit status unknown": 4}                   # an error's `reason`, as `report`
WATCH_READ_TIMEOUT_S = 30.0        # no byte (not even a keepalive) this long: reconnect
WATCH_RETRY_MAX_S = 10.0           # reconnection back-off, from 0.5 s doubling to this
WATCH_GIVE_UP_S = 300.0            # unreachable this long in a row: exit 2
BAR_WIDTH = 20
# What a run may write to the watcher's terminal: SGR colours (ESC [ ... m,
# what the page shows too). Every other control character, escape sequence
# (OSC 52 sets the clipboard, OSC 0 the title, OSC 8 makes links, DCS asks
# the terminal to answer) and C1 control (\x9b is an 8-bit CSI) is shown
# escaped.
TERMINAL_CONTROL = re.compile(r"(\x1b\[[0-9;:]*m)|[\x00-\x1f\x7f-\x9f]")


def _say(text):
    """Text for report's terminal, on stderr: a terminal that has gone
    (stderr closed, a pipe whose reader has exited) costs the text, never
    the program's stop or the run's end (it cost both: an AttributeError
    or a BrokenPipeError, and the program was killed with no SIGTERM)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _terminal_text(text, keep="\n\t"):
    """`text` safe to write to a terminal: SGR colours and `keep` pass, any
    other control character is shown as \\xNN."""
    return TERMINAL_CONTROL.sub(lambda m: m.group(1) or (
        m.group() if m.group() in keep else "\\x%02x" % ord(m.group())), text)


class _WatchError(Exception):
    """Bad usage or a server that cannot be reached: exit status 2."""


class _Unreachable(_WatchError):
    """The server cannot be reached, or answers that it cannot take a
    request now (408, 429, 5xx): a reporter waits and tries again."""


class _RunAddress:
    """Where a run is: the server's base URL, the run's id, and the
    credential to send (the operator's token, or a watch link's view key).
    Takes a watch link (`http://host:5000/#session=ID`, with `?view=KEY`
    behind a token), a `/progress/<id>` URL, or the server's URL and `run`.
    A server under a path behind a proxy (`https://site/jobs/#session=ID`)
    keeps that path before every request's."""

    def __init__(self, url, run=None, token=None, cafile=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _WatchError("%r is not an http:// or https:// URL" % url)
        found = re.fullmatch(r"(.*)/(?:progress|status)/(%s)" % SESSION_ID_PATTERN, parts.path)
        self.prefix = (found.group(1) if found else parts.path).rstrip("/")
        self.base = "%s://%s%s" % (parts.scheme, parts.netloc, self.prefix)
        self.view = _parse_query(parts.query).get("view")
        self.token = token
        fragment = re.fullmatch(r"session=(%s)" % SESSION_ID_PATTERN, parts.fragment)
        self.run = run or (found.group(2) if found else fragment.group(1) if fragment else None)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.context = None
        if parts.scheme == "https":
            if ssl is None:
                raise _WatchError("this Python has no ssl module for %s" % url)
            self.context = ssl.create_default_context(cafile=cafile)

    def connection(self, timeout):
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def path(self, path):
        return self.prefix + path + ("?view=" + urllib.parse.quote(self.view) if self.view else "")

    def headers(self, extra=None):
        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        headers.update(extra or {})
        return headers

    def request(self, method, path, body=None, content_type=None, timeout=NOTIFY_TIMEOUT_S):
        """(status, parsed JSON or None). Raises Unreachable."""
        conn = self.connection(timeout)
        headers = self.headers({"Accept": "application/json"})
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, self.path(path), body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _Unreachable("cannot reach %s: %s" % (self.base, exc))
        finally:
            conn.close()
        try:
            return response.status, _json_value(raw.decode("utf-8"))
        except ValueError:
            return response.status, None


def _read_sse(response):
    """(event name, id, data) for each event of an open stream, parsed as
    the WHATWG HTML standard says (comments and `retry:` skipped)."""
    name, data, event_id = "", [], None
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield name or "message", event_id, "\n".join(data)
            name, data = "", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            event_id = value


def _can_write(out, text):
    try:
        text.encode(getattr(out, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def _shutil_columns():
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 80


def _readable_number(value):
    if isinstance(value, float) and not value.is_integer():
        return "{:,.4g}".format(value) if abs(value) < 1000 else "{:,.1f}".format(value)
    return "{:,}".format(int(value)) if isinstance(value, (int, float)) else str(value)


def _readable_seconds(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % divmod(seconds, 60)
    return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)


def _counts_text(data):
    """("Epochs 1/2 · Batches 18/20", {labels used}): each level's count
    under its own label (a nested run's `bars`, else `stage` and
    iteration/total), so that the unit never changes when an inner bar
    closes (38/40 batches, then 2/2 epochs)."""
    bars = data.get("bars")
    if not (isinstance(bars, list) and bars and all(isinstance(b, dict) for b in bars)):
        bars = [{"label": data.get("stage"), "done": data.get("iteration"),
                 "total": data.get("total")}]
    counts, labels = [], set()
    for bar in bars:
        done, total, label = bar.get("done"), bar.get("total"), bar.get("label")
        if not isinstance(done, (int, float)):
            continue
        count = _readable_number(done) + ("/" + _readable_number(total)
                                          if isinstance(total, (int, float)) else "")
        if isinstance(label, str) and label:
            labels.add(label)
            count = label + " " + count
        counts.append(count)
    return " · ".join(counts), labels


def _progress_text(data, labels, fancy=True):
    """" 45% |█████████▏          | 270/600 · Epoch 3/10 · DPS 10,523 · ETA 33 s";
    `labels` is {field: (label, unit)} from GET /job; not `fancy`: ASCII only."""
    parts = []
    percent = data.get("percent")
    if isinstance(percent, (int, float)):
        filled = BAR_WIDTH * min(100.0, max(0.0, percent)) / 100.0
        if fancy:
            bar = "█" * int(filled) + (" ▏▎▍▌▋▊▉"[int((filled % 1) * 8)] if filled < BAR_WIDTH else "")
        else:
            bar = "#" * int(filled)
        parts.append("%3d%% |%s|" % (percent, bar.ljust(BAR_WIDTH)[:BAR_WIDTH]))
    counts, named = _counts_text(data)
    if counts:
        parts.append(counts)
    stage = data.get("stage")     # shown unless the counts' labels say it already
    words = [stage] if isinstance(stage, str) and set(stage.split(" · ")) - named else []
    for name, value in data.items():
        if name not in NOT_CHARTED and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and len(words) < 5:
            label, unit = labels.get(name, (name, None))
            if name == "rate" and isinstance(data.get("rate_unit"), str):
                unit = data["rate_unit"]        # a program's rate, in its own unit
            words.append("%s %s%s" % (label, _readable_number(value), " " + unit if unit else ""))
    elapsed = data.get("elapsed_s")
    if isinstance(percent, (int, float)) and 0 < percent < 100 and isinstance(elapsed, (int, float)):
        words.append("ETA " + _readable_seconds(elapsed * (100 - percent) / percent))
    line = " ".join(parts) + "".join(" · " + word for word in words)
    return line if fancy else line.replace(" · ", " | ").encode("ascii", "replace").decode()


class _ProgressLine:
    """Draws a run on a terminal as tqdm does: the job's log lines scroll
    above one progress line that is redrawn in place. Not a terminal (a
    pipe, a CI log): plain lines, a progress line at most every whole
    percent or PLAIN_EVERY_S."""

    PLAIN_EVERY_S = 10.0

    def __init__(self, out, labels, is_terminal):
        self.out, self.labels, self.terminal = out, labels, is_terminal
        self.unicode = _can_write(out, "█▏·")    # else ASCII: a C locale, an old console
        self.shown = ""            # the progress line on screen (terminal)
        self.last_plain = (None, 0.0)

    def log(self, text):
        self._clear()
        self.out.write(_terminal_text(text) + "\n")
        self._redraw()

    def progress(self, data):
        line = _terminal_text(_progress_text(data, self.labels, self.unicode), keep="")
        if self.terminal:
            self.shown = line
            self._redraw()
            return
        percent = data.get("percent")
        step = int(percent) if isinstance(percent, (int, float)) else None
        now = time.monotonic()
        if step != self.last_plain[0] or now - self.last_plain[1] >= self.PLAIN_EVERY_S:
            self.last_plain = (step, now)
            self.out.write(line + "\n")
            self.out.flush()

    def end(self, text):
        self._clear()
        self.shown = ""
        self.out.write(_terminal_text(text) + "\n")
        self.out.flush()

    def _clear(self):
        if self.terminal and self.shown:
            self.out.write("\r\x1b[K")

    def _redraw(self):
        if self.terminal and self.shown:
            width = _shutil_columns()
            self.out.write("\r\x1b[K" + self.shown[:width - 1])
        self.out.flush()


def _follow_stream(address, last_id):
    """The run's events after `last_id`, as (name, id, data dict)."""
    conn = address.connection(WATCH_READ_TIMEOUT_S)
    try:
        extra = {"Last-Event-ID": last_id} if last_id else {}
        conn.request("GET", address.path("/progress/" + address.run),
                     headers=address.headers(extra))
        response = conn.getresponse()
        if response.status == 404:
            raise _WatchError("the server has no run %s (it may have expired)" % address.run)
        if response.status in (401, 403):
            raise _WatchError("the server refused (%d): give --token or SSE_DEMO_TOKEN, or a "
                              "watch link with its view key" % response.status)
        if response.status == 204:
            raise _WatchError("the run is over and this client has seen its end")
        if response.status != 200:
            raise ConnectionError("the server answered %d" % response.status)
        for name, event_id, data in _read_sse(response):
            try:
                fields = _json_value(data)
            except ValueError:
                fields = {}
            yield name, event_id, fields if isinstance(fields, dict) else {}
    finally:
        conn.close()


def _show_event(screen, name, data):
    """Draw one event; the exit status once the run has ended, else None."""
    if name == "progress":
        if data.get("iteration") or data.get("total") is not None or \
                set(data) - NOT_CHARTED - {"stage", "bars"}:
            screen.progress(data)       # not the bare iteration 0 a run begins with
    elif name == "log":
        level = data.get("level", "info")
        screen.log(("" if level == "info" else level + ": ") + str(data.get("message", "")))
    elif name == "queued":
        estimate = data.get("estimated_start_s")
        screen.log("queued: position %s%s" % (data.get("position"), "" if estimate is None
                   else ", starts in about " + _readable_seconds(estimate)))
    elif name in WATCH_EXIT:
        if name == "complete":
            result = data.get("result")
            screen.end(_progress_text(dict(data, percent=data.get("percent", 100.0)), screen.labels,
                                      screen.unicode)
                       + "\ncomplete" + ("" if result is None else ": " + _json_line(result)))
        else:
            word = {"error": "failed", "cancelled": "cancelled", "interrupted": "interrupted",
                    "exit status unknown": "ended"}[data.get("reason") or name]
            screen.end("%s%s" % (word, ": " + str(data["message"]) if data.get("message") else ""))
            return WATCH_EXIT.get(data.get("reason"), WATCH_EXIT[name])
        return WATCH_EXIT[name]
    return None


def _watch_run(address, out=sys.stdout, is_terminal=None):
    """Follow a run to its end, reconnecting with Last-Event-ID when the
    connection drops or the server restarts. Returns the exit status:
    0 complete, 1 error, 3 cancelled; raises WatchError (2)."""
    if address.run is None:
        raise _WatchError("which run? give a watch link, a /progress/<id> URL, or --run ID")
    status, run = address.request("GET", "/status/" + address.run)
    if status in (401, 403, 429):
        raise _WatchError("the server refused (%d): give --token or SSE_DEMO_TOKEN, or a watch "
                          "link with its view key" % status)
    if status == 404:
        raise _WatchError("the server has no run %s (it may have expired)" % address.run)
    run = run if isinstance(run, dict) else {}
    job = {} if run.get("reported") else (address.request("GET", "/job")[1] or {})
    labels = {f["name"]: (f.get("label", f["name"]), f.get("unit")) for f in job.get("fields", [])
              if isinstance(f, dict) and "name" in f}
    out.write(_terminal_text("%s · run %s\n" % (run.get("title", "sse_demo"), address.run)))
    screen = _ProgressLine(out, labels, out.isatty() if is_terminal is None else is_terminal)
    last_id, delay, failing_since = None, 0.5, None
    while True:
        try:
            for name, event_id, data in _follow_stream(address, last_id):
                failing_since, delay = None, 0.5
                last_id = event_id or last_id
                ended = _show_event(screen, name, data)
                if ended is not None:
                    return ended
            raise ConnectionError("the stream ended before the run did")
        except _WatchError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            now = time.monotonic()
            if last_id is None and failing_since is None and not isinstance(exc, ConnectionError):
                raise _WatchError("cannot reach %s: %s" % (address.base, exc))
            failing_since = failing_since or now
            if now - failing_since > WATCH_GIVE_UP_S:
                raise _WatchError("%s has been unreachable for %d s" % (address.base,
                                                                        WATCH_GIVE_UP_S))
            screen.log("connection lost (%s); reconnecting in %.1f s" % (exc, delay))
            time.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_MAX_S)


def _start_remote(address, params, out=sys.stdout):
    """POST /start with NAME=VALUE parameters; the run's id."""
    pairs = []
    for item in params:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise _WatchError("--param wants NAME=VALUE, not %r" % item)
        pairs.append((name, value))
    status, answer = address.request("POST", "/start", urllib.parse.urlencode(pairs).encode(),
                                     "application/x-www-form-urlencoded")
    if status != 201 or not isinstance(answer, dict):
        reason = answer.get("error") if isinstance(answer, dict) else "status %d" % status
        raise _WatchError("the server did not start the run: %s" % reason)
    run = answer["session_id"]
    out.write(_terminal_text("started run %s\n  watch:  %s/%s#session=%s\n  cancel: curl -X "
                             "POST -H 'Authorization: Bearer %s' %s/cancel/%s\n" % (
                                 run, address.base, "?view=" + answer["view_key"]
                                 if address.token else "", run, answer["control_key"],
                                 address.base, run)))
    out.flush()
    return run


def _given_secret(path, variable, option, what):
    """A secret from the file `path`'s first line (named `option` in errors),
    else from the environment variable `variable`, else None: neither shows
    in `ps` as an argument does. Raises ValueError for a file that cannot
    be read or holds none."""
    if not path:
        return os.environ.get(variable, "").strip() or None
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
            if os.fstat(f.fileno()).st_mode & 0o077 and os.name == "posix":
                log.warning("warning: %s %s can be read by other users (chmod 600 %s)",
                            option, path, path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError("%s %s cannot be read: %s" % (option, path, exc))
    if not secret:
        raise ValueError("%s %s holds no %s on its first line" % (option, path, what))
    return secret


class _Parser(argparse.ArgumentParser):
    """argparse, saying a mistake in two lines: the reason, and where every
    option is listed. (Its own error() prints the whole usage first, 14
    lines for the server's options, which push the reason out of sight.)"""

    def error(self, message):
        self.exit(2, "%s: error: %s\n(%s --help lists every option)\n"
                  % (self.prog, message, self.prog))


def _add_token_options(p):
    """--token-file and --token (SSE_DEMO_TOKEN too), and --cacert: how a
    client reaches a server behind a token, over TLS."""
    p.add_argument("--token-file", metavar="FILE", help="the operator's token: this file's "
                   "first line (also SSE_DEMO_TOKEN)")
    p.add_argument("--token", help="the operator's token (every user sees it in ps: prefer "
                                   "--token-file or SSE_DEMO_TOKEN)")
    p.add_argument("--cacert", metavar="FILE", help="trust this certificate (https)")


def _given_token(args):
    return args.token or _given_secret(args.token_file, "SSE_DEMO_TOKEN", "--token-file",
                                       "token")


def _client_main(argv):
    """`watch URL` and `start URL`: exit status 0, 1, 3 as the run ended, 2
    for bad usage or a server that cannot be reached, 130 after Ctrl-C."""
    p = _Parser(prog="sse_demo.py " + argv[0])
    p.add_argument("url", help="the server (http://host:5000/), a watch link or a "
                               "/progress/<id> URL")
    if argv[0] == "watch":
        p.add_argument("--run", metavar="ID", help="the run, when URL is the server's")
    else:
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a parameter of the run; repeatable")
        p.add_argument("--watch", action="store_true", help="then follow it to its end")
    _add_token_options(p)
    args = p.parse_args(argv[1:])
    for stream in (sys.stdout, sys.stderr):   # a title or a log line the console cannot show
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        address = _RunAddress(args.url, getattr(args, "run", None), _given_token(args),
                              args.cacert)
        if argv[0] == "start":
            address.run = _start_remote(address, args.param)
            if not args.watch:
                return 0
        return _watch_run(address)
    except (_WatchError, ValueError) as exc:
        sys.stderr.write("error: %s\n" % _terminal_text(str(exc)))
        return 2
    except KeyboardInterrupt:
        sys.stdout.write("\nstopped watching; the run goes on on the server\n")
        return 130


###############################################################################
# Reporting from elsewhere: `sse_demo.py report URL -- PROGRAM`, and Reporter
###############################################################################

# The other side of POST /runs: a program, a log file or a Python loop on
# another machine, reported to a server. The same Progress and the same
# reading of a program's output as a run the server starts publish into an
# `_Outbox`, which stands in for the run's session and posts its events in
# batches.

REPORT_GATHER_S = 0.02             # a reporter lets events gather this long before a post
REPORT_BUFFER_EVENTS = 100000      # events a reporter keeps while the server is away;
                                   # past it, the oldest progress goes first (a warning says)
REPORT_RESEND_S = 10.0             # events the server took are kept this long after: a server
                                   # that crashed before its journal wrote them gets them again
REPORT_RETRY_S = (0.5, 30.0)       # a reporter's wait after a failed post: first, longest
REPORT_FLUSH_S = 60.0              # at the end, how long a reporter tries to deliver the rest
REPORT_TELL_WAIT_S = 2.0           # a reporter still delivering after this says so
REPORT_BUFFER_BYTES = 64 * 2 ** 20  # and their bytes at most
REPORT_POST_BYTES = 512 * 1024     # a reporter's post at most: under the 1 MB that nginx
                                   # takes by default (client_max_body_size)
REPORT_HEARTBEAT_S = 2.0           # a quiet reporter posts an empty batch this often: it
                                   # still lives, and hears a Cancel
REPORT_OPEN_WAIT_S = 3.0           # report's first POST /runs, before the job starts: a server
                                   # that does not answer by then is tried again by the thread
TAIL_POLL_S = 0.2                  # --tail: how often the file is looked at for more
TAIL_ROTATED_QUIET_S = 60.0        # --tail: a file rotated away is read until quiet this long
WIRE_SKIPPED = ("iteration", "total", "percent", "elapsed_s", "ts")   # the server makes these
REPORT_EXIT = {"cancelled": 3, "unknown": 4}   # else the program's; 128 + a signal that stops it


def _wire_event(name, data):
    """A published event, as Progress and a program's output make it, as an
    item of a batch (see _reported_call), encoded: the server makes the
    stamps, the percent and a terminal event's progress fields again. A
    message is cut as the server would (LOG_MESSAGE_LIMIT); an event still
    over REPORT_EVENT_BYTES raises ValueError (a result is replaced by a
    note: the run must still end). TypeError for one that is not strict
    JSON, as a job's publish raises."""
    if name == "progress":
        item = {k: v for k, v in data.items() if k not in WIRE_SKIPPED}
        if "bars" not in data:
            item.update(done=data.get("iteration"), total=data.get("total"))
    elif name == "log":
        item = {k: v for k, v in data.items() if k in ("message", "level", "stream")}
    else:
        kept = ("message", "exit_code", "signal", "reason") if name == "error" \
            else ("message", "result")
        item = {k: v for k, v in data.items() if k in kept}
    if isinstance(item.get("message"), str):
        item["message"] = _log_data(item["message"], "info")["message"]
    encoded = _json_line(dict({"event": name}, **item))
    if len(encoded) > REPORT_EVENT_BYTES and "result" in item:
        item["result"] = "(a result of %d bytes, too large to report)" % len(encoded)
        encoded = _json_line(dict({"event": name}, **item))
    if len(encoded) > REPORT_EVENT_BYTES and name == "progress":
        raise ValueError("an event of %d bytes, over %d" % (len(encoded), REPORT_EVENT_BYTES))
    return encoded


class _ReportRefused(Exception):
    """The server will take no more of this run's events (it ended, is
    unknown there, or the key is refused): reporting stops."""


class _BatchRefused(Exception):
    """The server refused a batch (400): the event it names (`events[3]...`)
    is dropped, with a warning, and the rest go again."""

    def __init__(self, message, index):
        super().__init__(message)
        self.index = index


class _Resend(Exception):
    """The server has fewer of the run's events than it took (it crashed
    before its journal wrote the last ones): send again from `received`."""

    def __init__(self, received):
        super().__init__("the server has %d events" % received)
        self.received = received


def _transient(status):
    """A status that a reporter waits out and tries again: a proxy's
    timeout, a server too busy now, one restarting behind a proxy."""
    return status in (408, 429) or status >= 500


def _batch_body(seq, batch):
    """A POST /runs/<id>/events body of as many of `batch`'s events (JSON
    texts) as fit in REPORT_POST_BYTES, and how many: at least one (each
    is under REPORT_EVENT_BYTES)."""
    size, taken = 0, 0
    for item in batch:
        size += len(item) + 1
        if taken and size > REPORT_POST_BYTES - 64:
            break
        taken += 1
    return ('{"seq":%d,"events":[%s]}' % (seq, ",".join(batch[:taken]))).encode(), taken


def _json_object(raw):
    """A server's JSON answer as a dict; {} for anything else."""
    try:
        answer = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _refusal(status, answer, posted, run):
    """What an answer other than 200 to a post of `posted` events means:
    the exception the reporter's thread acts on (see _Outbox._run)."""
    error = answer.get("error", "")
    if status == 409 and "state" in answer:
        return _ReportRefused("the run has ended on the server (%s)" % answer["state"])
    if status == 409 and type(answer.get("received")) is int:
        return _Resend(answer["received"])
    if status == 404:
        return _ReportRefused("the server no longer knows run %s (restarted without "
                              "--state-dir, or the run expired)" % run)
    named = re.match(r"events\[(\d+)\]", str(answer.get("param", "")))
    if status == 400 and named and int(named.group(1)) < posted:
        return _BatchRefused("the server refused an event: %s" % error, int(named.group(1)))
    if _transient(status):
        return _Unreachable("the server answered %d (%s)" % (status, error))
    return _ReportRefused("the server refused the events (%d): %s" % (status, error))


class _Outbox(_RunSink):
    """Stands in for a run's session on the reporting side: `Progress` and
    `_CommandOutput` publish into it as into a run (publish, cancel,
    latest_fields...), and its thread posts what they publish, in order, in
    batches, to the run it opened with POST /runs (opened by that thread
    when the server cannot be reached at first). A post that fails is sent
    again, with the same `seq`, so the server never takes an event twice;
    meanwhile events wait, at most REPORT_BUFFER_EVENTS and
    REPORT_BUFFER_BYTES. Events the server took are kept REPORT_RESEND_S
    more: a server that crashed before its journal wrote them says how many
    it has, and gets the rest again."""

    def __init__(self, address, title, params=None, flush_timeout_s=REPORT_FLUSH_S,
                 who="sse_demo report"):
        self.address = address
        self.who = who                    # what its messages begin with
        self.title, self.params = title or "a reported run", params or {}
        self.flush_timeout_s = flush_timeout_s
        self.id = self.report_key = self.view_key = None
        self.heartbeat_s = REPORT_HEARTBEAT_S
        self.cancel = threading.Event()   # the server says the run was cancelled (or Ctrl-C)
        self.state = None                 # how the run ended, once it did: its terminal event
        self._latest = {}
        self._changed = threading.Condition()   # guards everything below
        self._items = collections.deque()       # not yet taken by the server; seq _sent on;
        self._bytes = 0                         # each an event's JSON, and their length
        self._acked = collections.deque()       # (when, item) taken lately, oldest first
        self._sent = 0                          # events the server has taken
        self._posting = 0                       # items at the head of _items in a post
        self._ended = False                     # a terminal event was published
        self._done = False                      # the thread has stopped
        self._dropped = 0
        self._unreachable = False               # the last post could not reach the server
        self._thread = None
        self._connection = None

    # -- what Progress and _CommandOutput call, as on a session ---------------

    def publish(self, name, data):
        try:
            item = _wire_event(name, data)
        except ValueError as exc:      # one progress event too large: that one goes
            log.warning("%s: %s is not reported: %s", self.who, name, exc)
            return None
        with self._changed:
            if name in TERMINAL_STATES and self.state is None:
                self.state = name              # also when the server has ended it already
            if self._ended or self._done:
                return None
            if name != "log":
                self._latest = data
            while self._items and (len(self._items) >= REPORT_BUFFER_EVENTS or
                                   self._bytes + len(item) > REPORT_BUFFER_BYTES):
                self._drop_oldest()
            self._items.append(item)
            self._bytes += len(item)
            self._ended = name in TERMINAL_STATES
            self._changed.notify()
        return item

    def latest_fields(self):
        with self._changed:
            return _lasting_fields(self._latest)

    # -- opening, closing ------------------------------------------------------

    def open(self):
        """POST /runs. Raises WatchError when the server refuses (a wrong
        token); a server that cannot be reached yet is tried again by the
        thread, and the events wait."""
        try:
            self._open(REPORT_OPEN_WAIT_S)
        except _Unreachable as exc:
            log.warning("%s: %s; trying again, the events wait", self.who, exc)
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self._thread.start()

    def _open(self, timeout=NOTIFY_TIMEOUT_S):
        body = _json_line({"title": self.title, "params": self.params}).encode()
        status, answer = self.address.request("POST", "/runs", body, "application/json", timeout)
        reason = answer.get("error") if isinstance(answer, dict) else "status %d" % status
        if _transient(status):
            raise _Unreachable("the server answered %d (%s)" % (status, reason))
        if status == 401:
            raise _WatchError("the server needs the operator's token: give --token-file, "
                              "--token or SSE_DEMO_TOKEN (from Python: Reporter(token=...))")
        if status != 201 or not isinstance(answer, dict):
            raise _WatchError("the server did not open a run: %s" % reason)
        self.id, self.report_key = answer["session_id"], answer["report_key"]
        self.view_key = answer.get("view_key")
        self.heartbeat_s = min(REPORT_HEARTBEAT_S, answer.get("report_timeout_s", 300) / 3)
        self.address.run = self.id
        log.warning(self.who + ": run %s\n  watch:  %s\n  cancel: curl -X POST -H "
                    "'Authorization: Bearer %s' %s/cancel/%s", self.id, self.watch_url(),
                    answer["control_key"], self.address.base, self.id)

    def watch_url(self):
        view = "?view=" + self.view_key if self.address.token and self.view_key else ""
        return "%s/%s#session=%s" % (self.address.base, view, self.id)

    def close(self, timeout=None):
        """Wait until every event is posted, at most `timeout` seconds (the
        flush timeout), saying so when it takes long; True if they were.
        Then the thread stops. Ctrl-C meanwhile raises KeyboardInterrupt,
        as anywhere."""
        started = time.monotonic()
        deadline = started + (self.flush_timeout_s if timeout is None else timeout)
        told = False
        with self._changed:
            self._ended = True
            self._changed.notify()
            while not self._done and self._items and time.monotonic() < deadline:
                if not told and (self._unreachable or
                                 time.monotonic() - started >= REPORT_TELL_WAIT_S):
                    told = True
                    log.warning(self.who + ": delivering %d events to %s, for up to %.0f s "
                                "more (Ctrl-C gives up; %s)", len(self._items),
                                self.address.base, deadline - time.monotonic(),
                                "--flush-timeout" if self.who.endswith("report")
                                else "flush_timeout=")
                self._changed.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            left, self._done = len(self._items), True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(NOTIFY_TIMEOUT_S)    # at most one post still on its way
        if left:
            log.warning(self.who + ": %s could not be delivered to %s",
                        _counted(left, "event"), self.address.base)
        return not left

    def _drop_oldest(self):
        """The buffer is full: drop its oldest progress event (or line) that
        is not in the post under way."""
        for i in range(self._posting, len(self._items)):
            if self._items[i].startswith('{"event":"progress"'):
                break
        else:
            i = self._posting
        self._bytes -= len(self._items[i])
        del self._items[i]
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 10000 == 0:
            log.warning(self.who + ": the server is away and %d events wait; %d dropped "
                        "so far, oldest progress first", REPORT_BUFFER_EVENTS, self._dropped)

    # -- the thread that posts ---------------------------------------------------

    def _run(self):
        retry = REPORT_RETRY_S[0]
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            try:
                if self.id is None:
                    self._open()
                answer, posted = self._post(batch)
            except _ReportRefused as exc:
                if not self.cancel.is_set():
                    log.warning(self.who + ": %s; reporting stops", exc)
                break
            except (_BatchRefused, _Resend) as exc:
                self._set_back(exc)
                continue
            except _WatchError as exc:
                self._set_back(None)
                if not isinstance(exc, _Unreachable):
                    log.warning("%s: %s; reporting stops", self.who, exc)
                    break
                if not self._unreachable:
                    log.warning(self.who + ": %s; trying again, the events wait", exc)
                self._unreachable = True
                self._wait(retry)
                retry = min(REPORT_RETRY_S[1], retry * 2)
                continue
            if self._unreachable:
                log.warning(self.who + ": reached %s again", self.address.base)
            self._unreachable, retry = False, REPORT_RETRY_S[0]
            self._taken(posted)
            if answer.get("cancel"):
                self.cancel.set()
        with self._changed:
            self._done = True
            self._items.clear()
            self._changed.notify_all()
        if self._connection is not None:
            self._connection.close()

    def _next_batch(self):
        """The next items to post (left in the buffer until taken), an empty
        batch when it is time to say the reporter still lives, or None when
        everything is posted after the end."""
        with self._changed:
            quiet_until = time.monotonic() + self.heartbeat_s
            while not self._items and not self._done:
                if self._ended:
                    return None
                if not self._changed.wait(max(0.0, quiet_until - time.monotonic())):
                    return []
            if self._done:
                return None
        if not self._ended:
            time.sleep(REPORT_GATHER_S)        # let a burst gather into one post
        with self._changed:
            batch = list(itertools.islice(self._items, REPORT_BATCH_EVENTS))
            self._posting = len(batch)
            return batch

    def _taken(self, posted):
        """The server took the first `posted` items: kept a while, in case
        it loses them (see _Resend)."""
        now = time.monotonic()
        with self._changed:
            for _ in range(posted):
                item = self._items.popleft()
                self._bytes -= len(item)
                self._acked.append((now, item))
            self._sent += posted
            self._posting = 0
            while self._acked and (now - self._acked[0][0] > REPORT_RESEND_S or
                                   len(self._acked) + len(self._items) > REPORT_BUFFER_EVENTS):
                self._acked.popleft()
            self._changed.notify_all()

    def _set_back(self, refusal):
        """After a post that did not go through: drop the one event the
        server refused, or go back to where the server says it is."""
        with self._changed:
            self._posting = 0
            if isinstance(refusal, _BatchRefused):
                log.warning(self.who + ": %s; that event is dropped", refusal)
                self._bytes -= len(self._items[refusal.index])
                del self._items[refusal.index]
            elif isinstance(refusal, _Resend):
                self._resend_from(refusal.received)

    def _resend_from(self, received):
        """With the lock held: the server has `received` events, fewer than
        it took; the rest go again, from what is kept of them."""
        lacking = self._sent - received
        kept = min(lacking, len(self._acked))
        for _ in range(kept):
            item = self._acked.pop()[1]
            self._items.appendleft(item)
            self._bytes += len(item)
        log.warning(self.who + ": the server lost %d events it had taken (a crash before "
                    "it wrote them); sending them again", lacking)
        if lacking > kept:
            message = ("sse_demo report: %d events were lost: the server lost them, and the "
                       "reporter no longer held them" % (lacking - kept))
            log.warning(message)
            self._items.appendleft(_json_line({"event": "log", "message": message,
                                              "level": "warning"}))
        self._sent = received

    def _wait(self, seconds):
        with self._changed:
            if not self._done:
                self._changed.wait(seconds)

    def _post(self, batch):
        """POST the batch, or as much of its start as fits in
        REPORT_POST_BYTES: (the server's answer, events posted). Raises
        WatchError when the server cannot be reached, ReportRefused when it
        takes no more, Resend when it lost what it had taken."""
        body, posted = _batch_body(self._sent, batch)
        headers = {"Authorization": "Bearer " + self.report_key,
                   "Content-Type": "application/json", "Accept": "application/json"}
        try:
            if self._connection is None:
                self._connection = self.address.connection(NOTIFY_TIMEOUT_S)
            self._connection.request("POST", "%s/runs/%s/events" % (self.address.prefix, self.id),
                                     body=body, headers=headers)
            response = self._connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            if self._connection is not None:
                self._connection.close()
            self._connection = None
            raise _Unreachable("cannot reach %s: %s" % (self.address.base, exc))
        answer = _json_object(raw)
        if response.status == 200:
            return answer, posted
        if response.status == 409 and "state" in answer and answer.get("cancel"):
            self.cancel.set()
        raise _refusal(response.status, answer, posted, self.id)


class Reporter:
    """Report a Python loop's progress to a server elsewhere, with the same
    `progress` a `--job` function gets::

        with sse_demo.Reporter("http://host:5000/", token=TOKEN) as progress:
            for epoch in range(10):
                progress(epoch, 10, loss=train_one_epoch())

    The run opens on the server (POST /runs) when the block starts, and ends
    `complete` when it ends (`sys.exit(0)` too), `error` with an exception's
    message (or a non-zero `sys.exit`), and `cancelled` on Ctrl-C. Cancel on
    the page raises `Cancelled` at the next `progress(...)`; it ends the run
    `cancelled` and goes on out of the block, so that the code after the
    block does not run as if the job had finished (catch `Cancelled` to go
    on). `state` says how the run ended. Events are posted in batches by a
    thread of its own, and never block the loop; a server that cannot be
    reached is tried again, the events kept (at most REPORT_BUFFER_EVENTS),
    and the end waits up to `flush_timeout` seconds for them, saying so.
    """

    def __init__(self, url, token=None, title=None, params=None, cafile=None,
                 flush_timeout=REPORT_FLUSH_S):
        address = _RunAddress(url, token=token or os.environ.get("SSE_DEMO_TOKEN") or None,
                              cafile=cafile)
        self._outbox = _Outbox(address, title or (sys.argv[0] and _program_name(sys.argv)),
                               params, flush_timeout, who="sse_demo Reporter")
        self.progress = Progress(self._outbox)

    @property
    def run_id(self):
        """The run's id on the server (None until it is reached)."""
        return self._outbox.id

    @property
    def state(self):
        """How the run ended (`complete`, `error`, `cancelled`), or None."""
        return self._outbox.state

    def __enter__(self):
        """Opens the run; PermissionError when the server refuses to (the
        token), with its reason."""
        try:
            self._outbox.open()
        except _WatchError as exc:
            raise PermissionError(str(exc)) from None
        return self.progress

    def __exit__(self, kind, exc, traceback):
        if kind is None or kind is SystemExit and exc.code in (None, 0):
            self.end("complete")
        elif issubclass(kind, (Cancelled, KeyboardInterrupt)):
            self.end("cancelled")
        elif kind is SystemExit:
            self.end("error", message="the job exited with status %s" % exc.code,
                     exit_code=exc.code if type(exc.code) is int else 1)
        else:
            self.end("error", message=_describe_exception(exc))
        return False

    def end(self, state, result=None, message=None, **extra):
        """End the run (`complete`, `error` with a message, `cancelled`) and
        deliver what is left. True if every event reached the server."""
        if result is not None:
            extra["result"] = result
        if message is not None:
            extra["message"] = message
        _end_run(self._outbox, state, extra)
        return self._outbox.close()


def _process_alive(identity):
    """Does the process `identity` names still run (not a zombie, not a
    later process given its pid)?"""
    pid = identity["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                     # another user's: it exists
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False     # exited; its parent has not collected it yet
    except (OSError, IndexError):
        pass
    return _process_identity(pid) == identity


def _next_tail_file(current, path):
    """The file to go on reading after `current` read to its end: a new
    file at `path` when the old was moved away (logrotate; read from its
    start), `current` rewound when it was cut short (copytruncate), else
    `current`."""
    try:
        now = os.stat(path)
    except OSError:
        return current           # between a rename and the new file: wait
    if (now.st_ino, now.st_dev) != (os.fstat(current.fileno()).st_ino,
                                    os.fstat(current.fileno()).st_dev):
        try:
            return open(path, "rb", buffering=0)
        except OSError:
            return current
    if now.st_size < current.tell():
        current.seek(0)
    return current


def _open_tail(path, from_start):
    """--tail's file, at its start or its end; None while it does not exist
    (a job still queued): then all it gets is read, from its start."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
    if not from_start:
        f.seek(0, os.SEEK_END)
    return f


class _TailedFile:
    """A file --tail reads, as a program's output, with a screen of its own:
    a rotated file's unfinished last line is not glued to the next one's."""

    def __init__(self, f, output):
        self.f, self.output = f, output
        self.screen = _OutputScreen()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.grew = time.monotonic()

    def read(self):
        """Read what is there; True if there was something."""
        data = self.f.read(OUTPUT_READ_BYTES)
        if data:
            self.output.take(self.screen, self.decoder, data, None)
            self.grew = time.monotonic()
        return bool(data)

    def close(self):
        self.output.take(self.screen, self.decoder, b"", None, final=True)
        self.f.close()


def _follow_file(outbox, f, path, process, stop):
    """--tail: FILE's lines (`f`, opened by _open_tail, or None), read as a
    program's output (tqdm, JSON lines, log), until the process exits (then
    what it wrote last is read), the run is cancelled, or `stop` is set.
    Returns "exited", "cancelled" or "stopped". Across rotation, as `tail
    -F` does: a file moved away is read on while it grows (the job writes
    to it until it reopens its log), beside the new file at FILE."""
    output = _CommandOutput(outbox)
    while f is None:
        f = _open_tail(path, from_start=True)
        if f is None and stop.wait(TAIL_POLL_S):
            return "stopped"
    files = [_TailedFile(f, output)]         # the file at FILE last
    try:
        while True:
            if any([tailed.read() for tailed in files]):
                continue
            if outbox.cancel.is_set():
                return "cancelled"
            if process is not None and not _process_alive(process):
                while any([tailed.read() for tailed in files]):
                    pass
                following = _next_tail_file(files[-1].f, path)   # a rotation just before
                if following is not files[-1].f:
                    files.append(_TailedFile(following, output))
                    while files[-1].read():
                        pass
                return "exited"
            following = _next_tail_file(files[-1].f, path)
            if following is not files[-1].f:
                files.append(_TailedFile(following, output))
            for tailed in files[:-1]:
                if time.monotonic() - tailed.grew > TAIL_ROTATED_QUIET_S:
                    files.remove(tailed)
                    tailed.close()
            if stop.wait(TAIL_POLL_S):
                return "stopped"
    finally:
        for tailed in files:
            tailed.close()


def _stop_process(identity, kill_after_s):
    """Cancel of a followed job: SIGTERM, then SIGKILL after `kill_after_s`,
    only while the pid is still the same process."""
    for signum, wait in ((signal.SIGTERM, kill_after_s), (HARD_KILL, 1.0)):
        if not _process_alive(identity):
            return
        try:
            os.kill(identity["pid"], signum)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _process_alive(identity):
            time.sleep(COMMAND_POLL_S)


def _in_a_thread(name, work):
    """Run `work()` in a thread of its own: (an Event set when it has
    returned, a dict that then holds its `result`). The main thread waits
    on the Event, so that Ctrl-C reaches it as KeyboardInterrupt; a
    Thread.join that Ctrl-C interrupts may take the thread for ended."""
    done, answer = threading.Event(), {}

    def body():
        try:
            answer["result"] = work()
        finally:
            done.set()
    threading.Thread(target=body, name=name, daemon=True).start()
    return done, answer


def _until(done, timeout=None):
    """Wait for `done` in short sleeps: Ctrl-C or SIGTERM (KeyboardInterrupt,
    see _Interrupt) is raised in a sleep, never inside an Event's wait,
    where a second signal close behind the first broke its lock (a
    RuntimeError, and the program killed with no SIGTERM)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(SIGNAL_CHECK_S)
    return True


class _Interrupt:
    """SIGTERM taken as Ctrl-C is (`timeout`, Slurm and `kill` send it):
    KeyboardInterrupt in the main thread; `signal` says which came."""

    signal = signal.SIGINT

    @classmethod
    def handler(cls, signum, frame):
        cls.signal = signum
        raise KeyboardInterrupt

    @classmethod
    def name(cls):
        return "Ctrl-C" if cls.signal == signal.SIGINT else "SIGTERM"

    @classmethod
    def status(cls):
        return 128 + cls.signal


def _report_tail(outbox, f, path, process, kill_after_s):
    """`report URL --tail FILE [--pid PID]`, `f` opened and `process`
    found before the run was: the exit status."""
    stop = threading.Event()
    done, answer = _in_a_thread("tail", lambda: _follow_file(outbox, f, path, process, stop))
    try:
        _until(done)
    except KeyboardInterrupt:
        stop.set()
        _until(done, 5.0)
        _end_run(outbox, "cancelled", {})
        _say("\nstopped following %s; the run ends cancelled%s\n"
             % (path, ", the job goes on" if process else ""))
        return _Interrupt.status()
    if answer.get("result") == "exited":
        # Not our child: its exit status cannot be read, and is not guessed.
        _end_run(outbox, "error", {"message": "process %d ended; its exit status is unknown "
                                   "(report did not start it)" % process["pid"],
                                   "reason": "exit status unknown"})
        _say("process %d ended; its exit status is unknown\n" % process["pid"])
        return REPORT_EXIT["unknown"]
    if process is not None:
        _say("cancelled on the page: stopping process %d\n" % process["pid"])
        _stop_process(process, kill_after_s)
    else:
        _say("cancelled on the page: no longer following %s (the job was not "
             "started here, and no --pid names it, so it goes on)\n" % path)
    return REPORT_EXIT["cancelled"]


def _report_program(outbox, command, kill_after_s):
    """`report URL -- PROGRAM ARGS...`: run it here, its output shown and
    reported as --cmd reads it; the exit status. Ctrl-C stops the program
    as Cancel does (SIGTERM, SIGKILL after --kill-after), and the run ends
    cancelled; a second Ctrl-C kills it at once."""
    groups = _CommandGroups()
    echo = {name: getattr(stream, "buffer", None) for name, stream in
            (("stdout", sys.stdout), ("stderr", sys.stderr))}
    done, answer = _in_a_thread(
        "program", lambda: _run_program(outbox, command, kill_after_s, groups, echo))
    try:
        try:
            _until(done)
        except KeyboardInterrupt:
            outbox.cancel.set()
            _say("\n%s: stopping the program; the run ends cancelled "
                 "(%s again: at once)\n" % (_Interrupt.name(), _Interrupt.name()))
            _until(done, kill_after_s + 2.0)
            return _Interrupt.status()
    finally:
        if not done.is_set():      # a second signal: the run is cancelled, its program
            outbox.cancel.set()    # killed now (not a program that failed: SIGKILL)
        groups.close()
    status = answer.get("result")
    if outbox.state == "cancelled":
        _say("cancelled on the server (its page, or the cancel curl): the program "
             "was stopped\n")
        return REPORT_EXIT["cancelled"]
    if status is None:
        return 127                         # it did not start: the error event says why
    return status if status >= 0 else 128 - status


def _report_parser():
    p = _Parser(
        prog="sse_demo.py report", usage="%(prog)s URL [options] -- PROGRAM [ARGS...]\n"
        "       %(prog)s URL --tail FILE [--pid PID] [options]",
        description="Report a program's progress (its tqdm bars, JSON lines and output, read "
                    "as --cmd reads them) to an sse_demo server elsewhere.")
    p.add_argument("url", help="the server (http://host:5000/)")
    p.add_argument("--tail", metavar="FILE", help="follow a log file a running job writes "
                   "(nohup.out, slurm-*.out), across rotation")
    p.add_argument("--from-start", action="store_true", help="--tail: read FILE from its "
                   "start (default: only what is written from now on)")
    p.add_argument("--pid", type=int, help="--tail: the job's process; its exit ends the "
                   "run, and Cancel on the page stops it")
    p.add_argument("--title", help="the run's title (default: the program's or file's name)")
    p.add_argument("--kill-after", type=_kill_after_seconds, default=DEFAULT_KILL_AFTER_S,
                   metavar="S",
                   help="Cancel: SIGTERM, then SIGKILL after S seconds (default %(default)s)")
    p.add_argument("--flush-timeout", type=float, default=REPORT_FLUSH_S, metavar="S",
                   help="at the end, how long to keep trying to deliver events to a server "
                        "that cannot be reached (default %(default)s)")
    _add_token_options(p)
    return p


def _report_and_deliver(outbox, command, args, tailed, process):
    """The job reported, then what is left delivered; Ctrl-C at any stage
    ends it at once, saying what it gives up."""
    status = None
    try:
        if command:
            status = _report_program(outbox, command, args.kill_after)
        else:
            status = _report_tail(outbox, tailed, args.tail, process, args.kill_after)
        outbox.close()
        return status
    except KeyboardInterrupt:
        _say("\n%s%s: stopping at once; what is not delivered yet is given up\n"
             % (_Interrupt.name(), " again" if status is None else ""))
        _end_run(outbox, "cancelled", {})
        try:
            outbox.close(timeout=1.0)
        except KeyboardInterrupt:
            pass
        return _Interrupt.status()


def _report_main(argv):
    """`report URL [options] -- PROGRAM ARGS...` or `report URL --tail
    FILE`. Exit status: the program's (whether or not the server could be
    reached: it says so), 3 cancelled on the server, 4 a followed --pid
    ended with an exit status report cannot know, 2 bad usage or a server
    that refuses, 127 a program not found, 130 (143) after Ctrl-C
    (SIGTERM): the run then ends cancelled."""
    command = []
    if "--" in argv:
        command = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = _report_parser()
    args, extra = p.parse_known_args(argv[1:])
    if extra:
        p.error("unrecognized arguments: %s (a program goes after --: report URL -- PROGRAM "
                "ARGS...)" % " ".join(extra))
    if bool(command) == bool(args.tail):
        p.error("give a program after --, or --tail FILE")
    if (args.pid is not None or args.from_start) and not args.tail:
        p.error("--pid and --from-start go with --tail")
    if not args.flush_timeout >= 0:
        p.error("--flush-timeout must be 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if command and shutil.which(command[0]) is None:
        _say("error: program not found: %s\n" % command[0])
        return 127
    signal.signal(signal.SIGTERM, _Interrupt.handler)       # as Ctrl-C: `timeout`, Slurm, kill
    tailed = process = None
    try:
        if args.pid is not None:
            process = _process_identity(args.pid)
            if not _process_alive(process):
                raise _WatchError("no process %d runs here" % args.pid)
        if args.tail:          # its end is where the run starts reading, whenever that is
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.tail))):
                raise _WatchError("no folder %s for --tail" % os.path.dirname(args.tail))
            tailed = _open_tail(args.tail, args.from_start)
            if tailed is None:
                log.warning("sse_demo report: %s is not there yet; waiting for it", args.tail)
        address = _RunAddress(args.url, token=_given_token(args), cafile=args.cacert)
        named = (_program_name(command) if command else os.path.basename(args.tail)).strip()
        outbox = _Outbox(address, args.title or named[:REPORT_TITLE_LIMIT].strip() or "a program",
                         flush_timeout_s=args.flush_timeout)   # a long file name is still a title
        outbox.open()
    except (_WatchError, OSError, ValueError) as exc:
        if tailed is not None:
            tailed.close()
        _say("error: %s\n" % exc)
        return 2
    except KeyboardInterrupt:
        _say("\nstopped before the run opened\n")
        return _Interrupt.status()
    return _report_and_deliver(outbox, command, args, tailed, process)


###############################################################################
# The server and the command line
###############################################################################



def _join_until(thread, deadline):
    """Wait for `thread` until `deadline` (monotonic), SIGNAL_CHECK_S at a
    time. Python runs a signal's handler in the main thread only, between
    two bytecodes, and a signal the kernel hands another thread does not
    wake a main thread blocked in one long join: a second Ctrl-C while the
    server waits for its runs must still act at once."""
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        thread.join(min(SIGNAL_CHECK_S, left))


def _tls_context(certfile, keyfile=None):
    """A server context for --certfile/--keyfile: TLS 1.2 or newer, and no
    renegotiation (the writer's non-blocking sends never wait on a peer's
    handshake). Raises OSError or ssl.SSLError for a file it cannot use."""
    if ssl is None:
        raise OSError("this Python has no ssl module (built without OpenSSL)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(certfile, keyfile)
    return context


def _csp_for(page):
    """A Content-Security-Policy that allows the page's own inline script and
    style by hash, and nothing from anywhere else."""
    def hashes(tag):
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(b).digest()).decode()
                        for b in blocks) or "'none'"
    return ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'" % (hashes(b"script"), hashes(b"style")))


def _read_page():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        log.warning("warning: cannot read the page, so / answers 500 (copy index.html next "
                    "to sse_demo.py; the API works without it): %s", exc.strerror or exc)
        return None


OPTION_RULES = dict(flag=None, metavar=None, least=None, above=None, most=None, needs=None,
                    many=False, choices=None, secret=None)


def _option(default, help, flag=None, metavar=None, **rules):
    """A field of Options, with what the command line needs of it: its flag
    (default `--name`), metavar and help, and `rules`: the least value it
    takes (`least`, or more than `above`) and the most (`most`: past it, a
    time no longer fits the timeouts it goes to); the option it `needs`
    (given without it, it is refused); `many`: repeatable; `secret`: the
    environment variable that may hold it, and a `FLAG-file` option beside
    it (`ps` shows arguments, not files or the environment)."""
    return dataclasses.field(default=default, metadata=dict(
        OPTION_RULES, help=help, flag=flag, metavar=metavar, **rules))


def _within_rule(value, rule):
    """Whether an option's value keeps its rule (_option): a finite number
    (NaN, infinity, a string or None never is) within its bounds."""
    least, above, most = rule.get("least"), rule.get("above"), rule.get("most")
    if least is None and above is None and most is None:
        return True
    return _is_finite_number(value) and (least is None or value >= least) and \
        (above is None or value > above) and (most is None or value <= most)


def _rule_words(rule):
    """What an option's rule takes, in words: "at least 1", "from 0.1 to
    3600", "a number above 0" (the rules the options have: a least, with
    or without a most, or an above alone)."""
    least, above, most = rule.get("least"), rule.get("above"), rule.get("most")
    if least == 0 and most is None:
        return "0 (no limit) or more"
    if least is None:
        return "a number above %s" % above
    return "at least %s" % least if most is None else "from %s to %s" % (least, most)


@dataclasses.dataclass
class Options:
    """Every setting of the server, with its default and its help. The
    command line is made from these fields (`_build_parser`), `serve()` and
    `make_server()` take them by name, and the server takes them whole: a
    new option is one field here, and its use."""

    host: str = _option("127.0.0.1", "address to listen on (default %(default)s: this "
                        "machine only)")
    port: int = _option(5000, "port to listen on; 0 picks a free one (default %(default)s)")
    keepalive_s: float = _option(1.0, "send a keepalive comment when a stream has been quiet "
                                 "this long, from 0.1 s to an hour (default %(default)s)",
                                 "--keepalive", "SECONDS", least=0.1, most=3600)
    max_sessions: int = _option(1000, "runs going on at once, reported ones included; more "
                                "get 429 (default %(default)s)", metavar="N", least=1)
    max_streams: int = _option(10000, "open event streams (and /log?follow=1 followers) at "
                               "once; more get 503 (default %(default)s)", metavar="N", least=1)
    max_per_address: int = _option(128, "connections one client address may have being read "
                                   "or answered at once (streams and idle keep-alive ones not "
                                   "counted; a --trusted-proxy has no limit); more get 503; 0: "
                                   "no limit (default %(default)s)", metavar="N", least=0)
    session_ttl_s: float = _option(600.0, "forget a run this long after it ends (default "
                                   "%(default)s)", "--session-ttl", "SECONDS", above=0)
    request_timeout_s: float = _option(10.0, "a request must arrive whole within this; also "
                                       "how long an idle connection is kept (default "
                                       "%(default)s)", "--request-timeout", "SECONDS",
                                       least=0.1, most=86400)
    allowed_hosts: tuple = _option((), "also answer requests for this host name (behind a "
                                   "proxy or on a network); repeatable", "--allow-host", "NAME",
                                   many=True)
    trusted_proxies: tuple = _option((), "requests from this IP address come through your "
                                     "reverse proxy: the lock-out counts the client it names "
                                     "last in X-Forwarded-For, and --max-per-address does not "
                                     "limit it; repeatable", "--trusted-proxy", "ADDRESS",
                                     many=True)
    base_path: str = _option("", "the path a reverse proxy serves it under (/jobs), for a "
                             "proxy that does not send X-Forwarded-Prefix: the sign-in "
                             "returns there", metavar="PATH")
    concurrency: int = _option(0, "run at most N runs at once; the others wait in a queue, "
                               "first in, first out (default: no limit but --max-sessions)",
                               metavar="N", least=0)
    max_queue: int = _option(1000, "with --concurrency, runs that may wait; more get 429 "
                             "(default %(default)s)", metavar="N", least=1, needs="concurrency")
    state_dir: str = _option(None, "also journal every event under DIR, and read the runs "
                             "back after a restart (a run the restart cut short ends with an "
                             "error saying so)", metavar="DIR")
    max_record_mb: float = _option(16.0, "memory for each run's whole record (GET /log, "
                                   "/export); past it, progress events are thinned, then log "
                                   "lines from the middle of the run dropped (default "
                                   "%(default)s)", metavar="MB", least=0.01, most=1000000)
    report_timeout_s: float = _option(300.0, "a run reported from elsewhere (POST /runs, "
                                      "`sse_demo.py report`) that posts nothing for S seconds "
                                      "ends `error` (default %(default)s)", "--report-timeout",
                                      "S", least=1)
    grip: str = _option(None, "publish events to Pushpin's publish endpoint (e.g. "
                        "http://127.0.0.1:5561) and let it hold streams that come through it",
                        metavar="URL")
    grip_key: str = _option(None, "Pushpin's sig_key: verify the Grip-Sig of requests that "
                            "claim to come through Pushpin", metavar="KEY", needs="grip",
                            secret="SSE_DEMO_GRIP_KEY")
    notify: str = _option(None, "POST a JSON object to URL when a run ends (retried, never "
                          "delaying a run)", metavar="URL")
    notify_key: str = _option(None, "sign --notify bodies: X-SSE-Demo-Signature: sha256=<HMAC "
                              "of the body>", metavar="KEY", needs="notify",
                              secret="SSE_DEMO_NOTIFY_KEY")
    notify_format: str = _option("json", "json: the run's fields; slack: {\"text\": ...}, for "
                                 "Slack's and Mattermost's incoming webhooks (default "
                                 "%(default)s)", needs="notify", choices=("json", "slack"))
    certfile: str = _option(None, "serve HTTPS (TLS 1.2 or newer) with this PEM certificate "
                            "chain", metavar="FILE")
    keyfile: str = _option(None, "the certificate's private key, when --certfile does not "
                           "hold it", metavar="FILE", needs="certfile")
    token: str = None      # the operator's: not an option of its own (see _access_token)

    def check(self):
        """Raises ValueError, naming the option, for a value it cannot take."""
        for field in dataclasses.fields(self):
            value, rule = getattr(self, field.name), field.metadata
            named = "--" + (rule.get("flag") or field.name).lstrip("-").replace("_", "-")
            if not _within_rule(value, rule):
                raise ValueError("%s must be %s" % (named, _rule_words(rule)))
        if not 0 <= self.port <= 65535:        # (bind()'s OverflowError was a traceback)
            raise ValueError("--port must be from 0 (a free one) to 65535")
        if not FORWARDED_PREFIX.fullmatch(self.base_path.rstrip("/")):
            raise ValueError("--base-path must be a plain path such as /jobs")
        for name in self.allowed_hosts:      # ('' or a URL never matched a request: silent)
            if not _is_allowed_host_name(name):
                raise ValueError("--allow-host %r is not a host name or an IP address (give "
                                 "it without a scheme, port or path; a name in other letters "
                                 "than a-z as its xn-- form)" % name)
        for address in self.trusted_proxies:
            if _normal_ip(address) is None:
                raise ValueError("--trusted-proxy %s is not an IP address" % address)
        if self.token is not None:
            _check_token(self.token)


class _SocketServer(http.server.ThreadingHTTPServer):
    """The sockets: binding (no DNS look-up), accepting (TLS's handshake
    left to the connection's own thread), a thread per request within
    --max-per-address, connections the hub parked coming back, and errors
    of clients that went away kept out of stderr. SSEServer adds the runs."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    tls = None        # an ssl.SSLContext once started, with --certfile

    def handle_error(self, request, client_address):
        """socketserver calls this for an exception that escaped the handler
        (it would print a traceback to stderr). A client that went away at
        any stage (request line, headers, body, error answer, keep-alive) is
        normal: one debug line. Anything else is logged once, with its
        traceback, through logging."""
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            log.debug("client %s went away: %r", client_address[0], error)
        else:
            log.error("error answering %s", client_address[0], exc_info=True)

    def get_request(self):
        """Accept; under TLS the handshake is left to the connection's own
        thread (_Handler.finish_handshake), so a slow one delays no one."""
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address):
        """A thread of its own answers the connection, unless its address
        has --max-per-address connections in threads already: then it is
        refused from this thread (the one that accepted it, or the writer
        that held it parked). Counted by the peer's address, before any
        header: a --trusted-proxy speaks for many clients and has no limit.
        Streams and idle keep-alive connections, which the writer holds
        without a thread, do not count: --max-streams bounds the streams,
        and a browser keeps its streams open for as long as a tab is."""
        address = _normal_ip(client_address[0]) or client_address[0]   # as --trusted-proxy
        if not self.take_place(address):
            return self.refuse(request, address)
        try:
            super().process_request(request, client_address)
        except BaseException:          # no thread: "can't start new thread"
            self.let_go(address)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.let_go(_normal_ip(client_address[0]) or client_address[0])

    def take_place(self, address):
        """Count one more connection of `address` in a thread; False (and
        not counted) when it has its --max-per-address."""
        with self._per_address_lock:
            count = self._per_address.get(address, 0)
            if 0 < self.options.max_per_address <= count and address not in self.trusted_proxies:
                return False
            self._per_address[address] = count + 1
            return True

    def let_go(self, address):
        with self._per_address_lock:
            count = self._per_address.pop(address) - 1
            if count:
                self._per_address[address] = count

    def refuse(self, sock, address):
        """503 past --max-per-address, without a thread and without
        blocking: what has come of the request is read first, so that
        closing sends the answer rather than a reset (a client still
        sending its request may get the reset). A TLS connection is closed
        unanswered: its handshake would need a thread."""
        log.info("%s has %d connections being answered (--max-per-address): one more "
                 "refused", address, self.options.max_per_address)
        if not _is_tls(sock):
            body = _json_line({"error": "too many connections from your address (limit %d); "
                              "try again later" % self.options.max_per_address}).encode() + b"\n"
            sock.setblocking(False)
            try:
                sock.recv(65536)
            except OSError:
                pass           # nothing has come yet
            try:
                sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\nRetry-After: %d\r\nCache-Control: no-store"
                          b"\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n\r\n%s"
                          % (len(body), RETRY_AFTER_S, body))
            except OSError:
                pass           # it has gone
        self.shutdown_request(sock)

    def shutdown_request(self, request):
        """After a handler thread: close its connection, unless this thread
        handed it to the hub (_Handler.take_connection)."""
        if getattr(HANDED_TO_HUB, "sock", None) is request:
            HANDED_TO_HUB.sock = None
            return
        super().shutdown_request(request)

    def resume_connection(self, sock, address):
        """A connection the hub held parked has a request: answer it in a new
        thread."""
        self.process_request(sock, address)

    def server_bind(self):
        # HTTPServer.server_bind() calls socket.getfqdn(), a DNS look-up that
        # can take seconds on a machine without DNS: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self):
        """The address to open, named as another machine would reach it."""
        host, port = self.server_address[:2]
        return "%s://%s:%d/" % ("https" if self.tls else "http", _public_host(host), port)

    def host_allowed(self, name):
        """The bound address, localhost or an --allow-host name; on a wildcard
        address any IP literal (an IP is not a name an attacker can rebind)."""
        return name in self.allowed_hosts or (self.wildcard and _is_ip_literal(name))



class SSEServer(_SocketServer):
    """The HTTP server, its sessions and its stream writer."""

    hub = None        # until the socket is bound
    stopping = False  # server_close() has begun: /log followers end

    def __init__(self, options, job=None):
        """Bind, as `options` say (an Options, checked: ValueError names an
        option it cannot take); `start()` does the rest."""
        options.check()
        self.options = o = options
        host, port = o.host, o.port
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.job = job if isinstance(job, JobSpec) else (function_job(job) if job else BUILTIN_JOB)
        super().__init__((host, port), _Handler)
        self._per_address_lock = threading.Lock()  # guards _per_address
        self._per_address = {}                     # peer address -> its connections in threads
        self.supervisor = _Supervisor()
        self.hub = _StreamHub(o.keepalive_s, o.request_timeout_s, o.max_streams,
                              self.resume_connection)
        self.journal = _Journal(o.state_dir) if o.state_dir else None
        self.queue = _RunQueue(o.concurrency, o.max_queue, self.start_run)
        self.reported = _ReportedRuns(o.report_timeout_s,
                                      self.journal.note_received if self.journal else None)
        self.notifier = _Notifier(o.notify, o.notify_key, o.notify_format) if o.notify else None
        self.grip = _GripPublisher(o.grip) if o.grip else None
        self.feed = _RunsFeed(lambda session: self.describe_run(session, with_view_key=True),
                              _Listeners([part for part in (self.hub, self.grip) if part]),
                              lambda session: self.grip is not None or self.hub.followed(session))
        self._start_lock = threading.Lock()   # one /start at a time: admission, journal, queue
        # Every part that reacts to runs, in one list: see _RunListener.
        self.listeners = [part for part in (self.hub, self.feed, self.grip, self.journal,
                                            self.notifier, self.queue, self.reported) if part]
        # With a queue, --max-queue limits the runs that wait and --concurrency
        # those that run; --max-sessions is for a server without a queue.
        self.registry = _Registry(o.max_sessions, o.session_ttl_s, self.listeners,
                                  int(o.max_record_mb * 2 ** 20),
                                  o.concurrency + o.max_queue if o.concurrency else None)
        self.page = self.page_csp = None      # index.html, read by start()
        self.allowed_hosts = {"localhost", host.lower().strip("[]"), self.server_address[0]}
        self.allowed_hosts.update(_allowed_host_name(h) for h in o.allowed_hosts)
        self.wildcard = self.server_address[0] in ("0.0.0.0", "::")
        if self.wildcard:
            self.allowed_hosts.add(socket.gethostname().lower())   # the name it prints
        self.access = _Access(o.token, self.server_address[1]) if o.token else None
        self.gate = _Gate(self)
        self.trusted_proxies = frozenset(map(_normal_ip, o.trusted_proxies))
        self.base_path = o.base_path.rstrip("/")   # where a proxy serves it, if it cannot say
        if self.hub.max_streams < o.max_streams:
            log.warning("this platform's selector is select(), which watches at most %d "
                        "sockets: --max-streams lowered from %d to %d", self.hub.capacity,
                        o.max_streams, self.hub.max_streams)

    started = False

    def start(self):
        """Read the page, the certificate and the journal's runs, and start
        the background threads; then serve_forever(). (The constructor only
        binds.) Raises OSError (ssl.SSLError is one) when --state-dir or the
        certificate cannot be used: then close the server."""
        if self.started:
            return
        o = self.options
        if o.state_dir:
            _Journal.prepare(o.state_dir)
        if o.certfile:
            self.tls = _tls_context(o.certfile, o.keyfile)
        self.page = _read_page()
        self.page_csp = _csp_for(self.page or b"")
        self.started = True
        if self.journal:
            ended, waiting, reported = self.restore_runs(o.state_dir, o.session_ttl_s)
            self.registry.restore(ended)
            for session in ended if self.grip else ():
                self.grip.all_offered(session)
            self.journal.start(self.supervisor)
            for header, events in waiting:
                self.requeue(header, events)
            for header, events in reported:
                self.resume_reported(header, events)
        self.reported.start(self.supervisor)
        if self.grip:
            self.grip.start(self.supervisor)
        if self.notifier:
            self.notifier.start(self.supervisor)
        self.feed.start(self.supervisor)
        self.hub.start(self.supervisor)

    def serve_forever(self, poll_interval=0.5):
        """Serve until shutdown(); start()s the server first if need be, and
        starts the runs its journal held queued (see _RunQueue.release)."""
        self.start()
        self.queue.release()
        super().serve_forever(poll_interval)

    def restore_runs(self, state_dir, session_ttl_s):
        """The runs the journal holds: ended sessions; the runs that were
        waiting in the queue, to queue again in their order; and the runs
        reported from elsewhere that go on."""
        restored, waiting, reported = [], [], []
        for header, events in _load_journal(state_dir, session_ttl_s):
            if header["waiting"] or header["reported"]:
                (waiting if header["waiting"] else reported).append((header, events))
                continue
            restored.append(_session_read_back(header, events,
                                               _journal_path(state_dir, header["session_id"]),
                                               self.registry.listeners))
        if restored or waiting or reported:
            log.info("%s read back from the journal in %s: %d still queued, %d reported "
                     "from elsewhere and going on",
                     _counted(len(restored) + len(waiting) + len(reported), "run"),
                     state_dir, len(waiting), len(reported))
        return restored, sorted(waiting, key=lambda run: run[0]["started_ts"]), reported

    def take_back(self, header, events, state):
        """A run the journal holds that goes on (queued, or reported from
        elsewhere): in the registry again under its own id and keys, its
        held events replayed; its ids go on past its journal's mark."""
        report_key = header["report_key"] if header.get("reported") else None
        session = self.registry.create(header["title"], header["params"], state,
                                       header["session_id"], within_limit=False,
                                       report_key=report_key)
        session.started_ts, session.began_ts = header["started_ts"], _began_ts(header)
        for name in ("view_key", "control_key"):
            if isinstance(header.get(name), str):
                setattr(session, name, header[name])
        session.replay(events, header.get("latest"))
        session.skip_ids(header.get("ids", 0))
        self.journal.guard_ids(session)
        return session

    def requeue(self, header, events):
        """A run that waited in the queue when the server stopped waits again."""
        session = self.take_back(header, events, "queued")
        try:     # the job may have changed since (an edited --cmd template)
            session.params = _parse_start_params(self.job,
                                                 [(list(header["params"].items()), True)])
        except (_HTTPError, BadParam) as exc:
            log.warning("queued run %s cannot run: %s", session.id, exc)
            return _end_run(session, "error", {"message": "its parameters no longer fit the "
                                               "job, which changed while it waited: %s" % exc})
        if self.queue.submit(session):
            self.queue.tell_place(session)

    def resume_reported(self, header, events):
        """A run reported from elsewhere goes on after a restart: its record
        continues from its journal file, its reporter's next post is taken,
        and its silence counts from now."""
        session = self.take_back(header, events, "running")
        session.started = time.monotonic() - max(0.0, time.time() - header["started_ts"])
        session.record = _ContinuedRecord(_journal_path(self.options.state_dir, session.id),
                                          header["lines"], self.registry.record_bytes,
                                          session._lock)
        session.series = _Series.from_state(header["series"])
        self.reported.add(session, header.get("received", 0))

    def _refuse_once_stopping(self):
        """No run starts once the server stops: the listening socket closes
        then, but a request read just before (or a second Ctrl-C that came
        before the first was acted on) would start one that nobody records."""
        if self.stopping:
            raise _TooBusy(503, "the server is stopping")

    def open_reported_run(self, title, params):
        """A run that another machine reports: no thread, no slot in the
        queue; it counts toward --max-sessions. With a journal it is on
        disk before POST /runs answers."""
        with self._start_lock:
            self._refuse_once_stopping()
            session = self.registry.create(title or "a reported run", params,
                                           report_key=secrets.token_urlsafe(TOKEN_BYTES))
            on_disk = self.journal.begin(session) if self.journal else None
            self.reported.add(session, received=0)
        if on_disk:
            on_disk()     # after the lock: a stalled disk holds up this request alone
        session.publish("progress", {"iteration": 0, "total": None})   # the stream is live
        return session

    def start_session(self, params):
        """Accept a run: it starts now, or waits in the queue. With a journal
        the run is on disk before /start answers, so it outlives a crash:
        admitted under the lock, it waits for the disk after it."""
        with self._start_lock:
            self._refuse_once_stopping()
            self.queue.check_room()
            state = "queued" if self.queue.would_wait() else "running"
            session = self.registry.create(self.job.title, params, state)
            on_disk = self.journal.begin(session) if self.journal else None
            try:
                queued = self.queue.submit(session)
            except (_TooBusy, RuntimeError) as exc:   # RuntimeError: "can't start new thread"
                self.registry.discard(session)
                if self.journal:
                    self.journal.forgotten(session)
                if isinstance(exc, _TooBusy):
                    raise
                raise _TooBusy(503, "cannot start another run now")
        if on_disk:
            on_disk()
        if queued:
            self.queue.tell_place(session)
        return session

    def describe_run(self, session, with_view_key):
        """A run's entry in /runs and /runs/events."""
        return dict(session.summary(), **self.run_extras(session, with_view_key))

    def run_extras(self, session, with_view_key):
        """What the server adds to a run's entry and /status: a queued run's
        estimated start; the view key for the operator, whose page builds
        watch links from it (with no access control there is nothing to
        hold, and no viewer is told)."""
        extras = {}
        if session.state == "queued":
            extras["estimated_start_s"] = self.queue.estimated_start_s(session)
        if with_view_key and self.access is not None:
            extras["view_key"] = session.view_key
        return extras

    def start_run(self, session):
        """The queue gives the run a slot: it runs from now (called after the
        queue's lock). A run that waited is marked running in its journal,
        on disk before it is running and its job runs (its own thread waits
        for that, so no other start does), so a crash from here on ends it
        interrupted, not queued."""
        if session.cancel.is_set():     # cancelled while it was handed its slot
            return _end_run(session, "cancelled", {})
        session.began_ts = time.time() if session.state == "queued" else session.started_ts
        on_disk = None
        if session.state == "queued" and self.journal:
            on_disk = self.journal.note_running(session)

        def first():
            if on_disk:
                on_disk()
            session.mark_running()
        session.worker = self.job.start(session, session.params, first)

    def health(self):
        """What GET /healthz answers: counts, and each part that stopped."""
        sessions, running, queued = self.registry.counts()
        stopped = self.supervisor.problems()
        failure = self.hub.failure()
        if failure is not None:
            stopped.setdefault("stream writer", failure)
        problems = ["the %s has stopped: %s" % item for item in sorted(stopped.items())]
        if self.journal and self.journal.error is not None:
            problems.append("the journal cannot write: " + self.journal.error)
        health = {"ok": not problems, "sessions": sessions, "running": running,
                  "queued": queued, "streams": self.hub.streams}
        if problems:
            health["error"] = "; ".join(problems)
        if self.grip:
            health["grip"] = self.grip.stats()
        if self.journal:
            health["journal"] = self.journal.stats()
        if self.notifier:
            health["notify"] = self.notifier.stats()
        return health

    def server_close(self):
        """Close the listening socket, end every stream, stop every run. Call
        shutdown() first (from another thread than serve_forever's).

        Streams end first, with the last chunk and no terminal event: the
        runs are not over, the server is going away, so browsers reconnect
        (and learn from a restarted server whether the run still exists)."""
        if self.hub is None:     # binding failed: nothing else was started
            super().server_close()
            return
        # Refuse new connections now: the runs below may take --kill-after,
        # and the kernel would queue connections that nobody will answer.
        self.socket.close()
        self.stopping = True
        if self.journal:
            self.journal.hurry()     # what the runs say as they stop reaches the disk soon
        self.queue.stop()        # a run that ends now frees no slot: nothing more starts
        self.hub.stop(timeout=HUB_STOP_TIMEOUT_S)
        self.reported.stop()
        # A reported run goes on elsewhere: with a journal, the server takes
        # it up again when it is back.
        running = [s for s in self.registry.running()
                   if s.state != "queued" and s.report_key is None]
        for session in running:
            session.stop_reason = INTERRUPTED
            session.cancel.set()
        if running:      # a --cmd program gets its --kill-after, to save a checkpoint
            log.info("stopping %s: up to %.1f s for them to end (Ctrl-C again: at once)",
                     _counted(len(running), "run"), self.job.stop_grace_s)
        deadline = time.monotonic() + self.job.stop_grace_s
        for session in running:
            if session.worker is not None:
                _join_until(session.worker, deadline)
        self.job.stop_all()      # a command that ignored SIGTERM: no orphan
        if self.journal:
            self.journal.stop()    # after the runs' last events
        if self.grip:
            self.grip.stop()
        if self.notifier:
            self.notifier.stop()
        self.feed.stop()
        super().server_close()

    def stop_at_once(self):
        """A second Ctrl-C, from its signal handler, just before the process
        exits: the commands still running are killed, and what the runs
        published before it (a program's last lines) is written to the
        journal, not dropped with the process; their runs are read back
        interrupted."""
        self.stopping = True          # no run starts from here (_refuse_once_stopping)
        for part in (self.journal, self.notifier):
            if part:
                part.take_no_more()
        self.job.kill_now()
        if self.journal:
            self.journal.stop_at_once()


def make_server(host="127.0.0.1", port=5000, job=None, **options):
    """A bound server that does nothing yet: `start()` it (OSError when
    `state_dir` or the certificate cannot be used), run `serve_forever()` in
    a thread, and `shutdown()` then `server_close()` to stop it. `job` is a
    callable (see the module docstring); the options are Options' fields
    (TypeError names one that is not, ValueError a value it cannot take)."""
    return SSEServer(Options(host=host, port=port, **options), job)


def _say_at_once(signum):
    """The second signal's line, from its handler: os.write takes no lock
    (logging's would deadlock against an interrupted log call), and is
    skipped when it would wait (a terminal paused with Ctrl-S, a pipe
    nobody reads): exiting at once comes first."""
    try:
        fd = sys.stderr.fileno()
        if select.select([], [fd], [], 0)[1]:
            os.write(fd, b"\n%s again: stopping at once, killing the programs still "
                     b"running\n" % (b"Ctrl-C" if signum == signal.SIGINT else b"SIGTERM"))
    except (OSError, ValueError, AttributeError):      # no terminal left: exit all the same
        pass


def _install_stop_signals(on_exit_now=lambda: None):
    """SIGINT and SIGTERM append to the returned list; a second one calls
    `on_exit_now` (it kills running commands) and exits at once. The handler
    takes no lock: it runs in the main thread between two bytecodes, possibly
    while that thread holds the very lock (a threading.Event.set() here once
    deadlocked against the Event.wait() it interrupted)."""
    requested = []
    if threading.current_thread() is not threading.main_thread():
        return requested, lambda: None

    def on_signal(signum, frame):
        if len(requested) > 1:             # a third while the second's exit waits: now
            os._exit(128 + requested[1])
        requested.append(signum)
        if len(requested) > 1:
            _say_at_once(signum)
            on_exit_now()
            os._exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    return requested, lambda: [signal.signal(s, h) for s, h in previous.items()]


UNLIMITED_FILES_TARGET = 65536    # the soft limit asked for when the hard one is unlimited
GC_THRESHOLDS = (20000, 20, 100)  # the collector's, in a served process (CPython: 700 or 2000, 10, 10)


def _tune_garbage_collector():
    """Fewer, cheaper collections for a process that serves. Hundreds of runs
    at once allocate some 50,000 objects a second (each event's data, its
    encoding, its place in the history); with CPython's thresholds that is
    70 young collections a second and a full one every few seconds, and a
    full one stops every thread, streams included, for tens to hundreds of
    milliseconds (bench/load.py's sessions p99 went from hundreds of ms to
    tens with this). What start-up made (modules, the page) is frozen out
    of every collection. Only serve() does this: it owns its process; an
    application that embeds make_server() keeps its own settings."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _raise_open_file_limit():
    """Each stream is a socket: allow as many as the hard limit does."""
    try:
        import resource
    except ImportError:      # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_FILES_TARGET)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _is_loopback(address):
    return address == "localhost" or address.startswith("127.") or address == "::1"


def _serve_until_stopped(server, requested, show_token):
    """Say where it serves, then serve until `requested` has a signal."""
    if server.access is None and not _is_loopback(server.server_address[0]):
        log.warning("warning: --no-auth: anyone who can reach %s can start and watch runs",
                    server.url)
    _tune_garbage_collector()
    print("Serving on %s (Ctrl-C to stop)" % server.url, flush=True)
    if server.access is not None:
        print("Sign in: %s?token=%s" % (server.url, server.access.token) if show_token
              else "Sign in: %s with the token you gave (it is not printed)" % server.url,
              flush=True)
        if server.options.allowed_hosts:
            print("  (through your proxy: its own address, with the same ?token=)", flush=True)
    serving = threading.Thread(target=server.serve_forever, name="serve", daemon=True,
                               kwargs={"poll_interval": SIGNAL_CHECK_S})   # shutdown() waits for it
    serving.start()
    try:
        while not requested and serving.is_alive():
            serving.join(SIGNAL_CHECK_S)   # the handler only sets a flag
    finally:
        server.shutdown()
        server.server_close()


def serve(job=None, host="127.0.0.1", port=5000, show_token=False, **options):
    """Run the server until Ctrl-C or SIGTERM, like `python sse_demo.py`.
    With a token, it prints a sign-in URL, with the token in it only when
    `show_token` (the command line made it: one given in a file or the
    environment stays out of the terminal and its scroll-back). Returns the
    exit status.

    The signals are its own from the start: a Ctrl-C while it starts (a
    --state-dir of thousands of runs takes seconds to read back) lets the
    start finish, so that no journal is left half mended, and then stops
    it before it serves; a second exits at once, as it does later."""
    _raise_open_file_limit()
    server = None
    requested, restore = _install_stop_signals(
        lambda: server is not None and server.stop_at_once())
    try:
        try:
            server = make_server(host, port, job=job, **options)
        except OSError as exc:
            log.error("error: cannot listen on %s:%s: %s%s", host, port, exc.strerror or exc,
                      " (another program has that port: choose another with --port)"
                      if exc.errno == errno.EADDRINUSE else "")
            return 1
        try:
            server.start()      # the journal's runs are back before the URL is printed
        except OSError as exc:
            log.error("error: cannot start: %s", exc.strerror or exc)
            server.server_close()
            return 2
        if requested:           # stopped while it started: it never serves
            server.server_close()
        else:
            _serve_until_stopped(server, requested, show_token)
    finally:
        restore()
    log.info("stopped")
    return 0


def _load_job(spec):
    """`module:callable` -> a JobSpec. Raises ValueError with a one-line reason."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError("--job wants module:callable, got %r" % spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())     # as with `python -m`
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError("cannot import %r: %s" % (module_name, _describe_exception(exc)))
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError("%r has no attribute %r" % (module_name, attr))
    if not callable(target):
        raise ValueError("%s is not callable" % spec)
    try:
        return function_job(target)
    except TypeError as exc:
        raise ValueError("%s: %s" % (spec, exc))


def _access_token(args, options):
    """(the operator's token, whether the server made it): --token-file's
    first line, SSE_DEMO_TOKEN, or a new one whenever others can reach the
    server (a non-loopback address, or a proxy in front: --allow-host,
    --grip), unless --no-auth; (None, False) without one. Raises ValueError
    for a token file that cannot be read or is empty, or a weak token."""
    token = _given_secret(args.token_file, "SSE_DEMO_TOKEN", "--token-file", "token")
    if token:
        _check_token(token)
        return token, False
    reachable = not _is_loopback(options.host) or options.allowed_hosts or options.grip
    if reachable and not args.no_auth:
        return secrets.token_urlsafe(OPERATOR_TOKEN_BYTES), True
    return None, False


def _build_parser():
    """The command line: Options' fields, then what belongs to the command
    line alone (the job, the token, logging)."""
    p = _Parser(
        prog="sse_demo.py",
        description="Stream the progress of long-running jobs to a browser with "
                    "Server-Sent Events.",
        epilog="Clients of a server: `sse_demo.py watch URL` (a run in a terminal), `start "
               "URL`, and `report URL -- PROGRAM` or `report URL --tail FILE` (a run "
               "elsewhere); each has its own --help.")
    for field in dataclasses.fields(Options):
        rule = field.metadata
        if not rule:
            continue
        flag = rule["flag"] or "--" + field.name.replace("_", "-")
        named = dict(dest=field.name, metavar=rule["metavar"], choices=rule["choices"],
                     help=rule["help"].replace("%(default)s", str(field.default)))
        if rule["many"]:
            named["action"] = "append"
        elif field.default is not None:
            named["type"] = type(field.default)   # None when not given: see _options
        if rule["secret"]:      # KEY, or a file that holds it: ps shows every argument
            group = p.add_mutually_exclusive_group()
            named["help"] += " (every user sees it in ps: prefer %s-file or %s)" % (
                flag, rule["secret"])
            group.add_argument(flag, **named)
            group.add_argument(flag + "-file", dest=field.name + "_file", metavar="FILE",
                               help="%s from this file's first line" % flag)
        else:
            p.add_argument(flag, **named)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--job", metavar="MODULE:CALLABLE",
                       help="run this function for each start instead of the simulation")
    which.add_argument("--cmd", metavar="'PROGRAM ARGS...'",
                       help="run this program for each start instead of the simulation; "
                            "{name=default} in it is a parameter of /start; its output "
                            "lines are the log, JSON {\"done\": N} and tqdm lines the progress")
    p.add_argument("--title", metavar="TEXT",
                   help="the job's name on the page and in /job (default: the job's own "
                        "declaration, or the --cmd program's name)")
    p.add_argument("--kill-after", type=_kill_after_seconds, metavar="SECONDS",
                   help="with --cmd, Cancel sends SIGTERM to the program's process group, "
                        "and SIGKILL this long after (default %g)" % DEFAULT_KILL_AFTER_S)
    p.add_argument("--token-file", metavar="FILE",
                   help="the sign-in token is this file's first line (also: SSE_DEMO_TOKEN); "
                        "off loopback, or behind --allow-host or --grip, the server makes "
                        "one and prints a sign-in URL")
    p.add_argument("--no-auth", action="store_true",
                   help="serve a non-loopback address with no token, open to anyone who "
                        "can reach it (a warning says so)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="least severe message to log (default %(default)s)")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


def _options(args):
    """(Options from the command line, whether the server made its token).
    Raises ValueError naming an option it cannot take."""
    given = {}
    for field in dataclasses.fields(Options):
        rule, value = field.metadata, getattr(args, field.name, None)
        flag = rule.get("flag") or "--" + field.name.replace("_", "-")
        if rule.get("needs") and (value is not None or getattr(args, field.name + "_file", None))\
                and getattr(args, rule["needs"]) is None:
            raise ValueError("%s needs --%s" % (flag, rule["needs"]))
        if rule.get("secret"):
            value = value or _given_secret(getattr(args, field.name + "_file"), rule["secret"],
                                           flag + "-file", "key")
        if value is not None:
            given[field.name] = value
    if args.kill_after is not None and not args.cmd:
        raise ValueError("--kill-after needs --cmd")
    if args.no_auth and (args.token_file or os.environ.get("SSE_DEMO_TOKEN")):
        raise ValueError("--no-auth and a token (--token-file or SSE_DEMO_TOKEN) exclude "
                         "each other")
    if args.title is not None and not args.title.strip():
        raise ValueError("--title must not be empty")
    options = Options(**given)
    options.token, made = _access_token(args, options)
    options.check()
    return options, made


def _job_of(args):
    """The job the command line names: --job, --cmd, or the built-in one
    (renamed by --title). Raises ValueError with the reason."""
    if args.job:
        job = _load_job(args.job)
    elif args.cmd is not None:
        return command_job(args.cmd, DEFAULT_KILL_AFTER_S if args.kill_after is None
                           else args.kill_after, args.title)
    else:
        job = function_job(simulate_optimisation)
    job.title = args.title or job.title
    return job


def main(argv=None):
    """`python sse_demo.py [options]` serves; `python sse_demo.py watch|start
    URL ...` is the terminal client, `report URL ...` the reporting one.
    Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("watch", "start"):
        return _client_main(argv)
    if argv and argv[0] == "report":
        return _report_main(argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        options, made = _options(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    try:
        job = _job_of(args)
        if options.grip:
            _GripPublisher.check_url(options.grip)
        if options.notify:
            _Notifier.check_url(options.notify)
    except ValueError as exc:
        log.error("error: %s", exc)
        return 2
    for option, path, check in (   # before binding; an ssl.SSLError is an OSError
            ("--state-dir", options.state_dir, _Journal.prepare),
            ("--certfile", options.certfile, lambda path: _tls_context(path, options.keyfile))):
        try:
            if path:
                check(path)
        except OSError as exc:
            log.error("error: %s %s cannot be used: %s", option, path, exc.strerror or exc)
            return 2
    return serve(job=job, show_token=made, **dataclasses.asdict(options))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:    # before serve() took the signals (a --job's import): no
        sys.exit(128 + signal.SIGINT)       # server yet, nothing to stop, no traceback
