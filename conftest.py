"""The test harness for test_sse_demo.py, and pytest's fixtures on it:
servers in threads and in subprocesses, HTTP over real sockets, an SSE
stream parsed byte for byte, a headless Chromium driven over the DevTools
protocol, and real nginx and Pushpin processes, all always stopped or
reaped; and the markers that let CI select the tests that need the real
parts. The tests import what they use from here (`from conftest import
...`: pytest puts this folder on sys.path and loads this file as
`conftest`, so both are the same module). The behaviours under test are in
test_sse_demo.py; a helper that only one group of tests needs sits beside
those tests."""

import base64
import http.client
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import pytest

import sse_demo


HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10.0          # the most any single wait in these tests may take
FAST = {"tick": 0, "update_every": 1}


###############################################################################
# Helpers: a server in a thread, HTTP requests, a raw SSE stream reader
###############################################################################

class Running:
    """A server serving in a thread; stop() ends both and checks it did."""

    def __init__(self, port=0, host="127.0.0.1", **options):
        options.setdefault("keepalive_s", 0.2)
        options.setdefault("request_timeout_s", 3.0)
        self.server = sse_demo.make_server(host, port, **options)
        self.client_tls = None      # with certfile: a client context that trusts it
        if options.get("certfile"):
            self.client_tls = ssl.create_default_context(cafile=options["certfile"])
        self.server.start()         # the journal read back before the test goes on
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def request(srv, method, path, body=None, headers=None, json_body=None):
    """(status, headers, body bytes) over a fresh http.client connection."""
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    if getattr(srv, "client_tls", None):
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=TIMEOUT,
                                           context=srv.client_tls)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


_control_keys = {}      # session id -> the control key /start answered with (ids are
                        # 128 random bits: one table serves every server of the run)


def control_key(sid):
    """The control key /start answered for run `sid` (started by start_run)."""
    return _control_keys[sid]


def start_run(srv, **params):
    """Start a run; its session id (its control key is kept for `cancel`)."""
    status, _, body = request(srv, "POST", "/start", json_body=params)
    assert status == 201, body
    answer = json.loads(body)
    _control_keys[answer["session_id"]] = answer["control_key"]
    return answer["session_id"]


def cancel(srv, sid, key=None, headers=None, path=None):
    """POST /cancel with the run's control key (or `key`): (status, body)."""
    headers = dict(headers or {})
    headers.setdefault("Authorization", "Bearer " + (key or control_key(sid)))
    status, _, body = request(srv, "POST", path or "/cancel/" + sid, headers=headers)
    return status, body


def watch(srv, sid, headers=None, **options):
    """A Stream on the session's /progress path."""
    return Stream(srv, "/progress/" + sid, headers, **options)


def get_json(srv, path, headers=None):
    """GET a JSON endpoint that must answer 200."""
    status, _, body = request(srv, "GET", path, headers=headers)
    assert status == 200, body
    return json.loads(body)


def status_of(srv, sid):
    """The run's state from GET /status."""
    status, _, body = request(srv, "GET", "/status/" + sid)
    assert status == 200, body
    return json.loads(body)["state"]


def wait_for(condition, timeout=TIMEOUT, what="condition"):
    """Poll `condition` until it is true, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


def raw_exchange(srv, data, timeout=TIMEOUT):
    """Send raw bytes, read until the server closes, or until one whole
    answer with a Content-Length has come (the connection may stay open for
    the next request): the answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        received, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline and not _one_whole_answer(received):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


def _one_whole_answer(received):
    head, sep, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
    return bool(sep and length) and len(body) >= int(length.group(1))


def parse_head(raw):
    """(status, {lowercased name: value}, rest) of a raw response."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, "no complete response head in %r" % raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


class Stream:
    """An SSE stream over a raw socket, parsed byte for byte: the response
    head, then (for HTTP/1.1) the chunked framing, then SSE fields."""

    def __init__(self, srv, path, headers=None, version="HTTP/1.1", rcvbuf=None,
                 read_head=True, head_timeout=TIMEOUT):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.head_timeout = head_timeout
        self.sock.connect(("127.0.0.1", srv.port))
        if getattr(srv, "client_tls", None):
            self.sock = srv.client_tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        lines = ["GET %s %s" % (path, version), "Host: 127.0.0.1:%d" % srv.port]
        lines += ["%s: %s" % item for item in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        self.chunked = version == "HTTP/1.1"
        self.text = ""            # SSE text not yet parsed into blocks
        self.ended = False        # the last chunk (or end of file) was read
        self.raw_body = b""       # the body, de-chunked
        self.wire = b""           # every byte received, as it came
        if read_head:
            self.read_head()

    def read_head(self):
        """Wait for the response head (the request went out already)."""
        deadline = time.monotonic() + self.head_timeout
        while b"\r\n\r\n" not in self.buffer:
            self._fill(deadline)
        self.status, self.headers, self.buffer = parse_head(self.buffer)
        # The body's framing is what the response says (a proxy may change it)
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        length = self.headers.get("content-length")
        self.remaining = int(length) if length is not None else None

    def close(self):
        self.sock.close()

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buffer += data
        self.wire += data

    def _take(self, n, deadline):
        while len(self.buffer) < n:
            self._fill(deadline)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _line(self, deadline):
        while b"\r\n" not in self.buffer:
            self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_chunk(self, deadline):
        """One chunk's data; b"" for the last chunk (RFC 9112, 7.1)."""
        size_line = self._line(deadline)
        assert re.fullmatch(rb"[0-9a-f]+", size_line), size_line
        size = int(size_line, 16)
        data = self._take(size, deadline)
        assert self._take(2, deadline) == b"\r\n", "chunk not followed by CRLF"
        if size == 0:
            self.ended = True
        return data

    def read_body_piece(self, deadline):
        if self.chunked:
            return self.read_chunk(deadline)
        if self.remaining is not None:
            data = self._take(min(self.remaining, max(1, len(self.buffer))), deadline)
            self.remaining -= len(data)
            self.ended = self.remaining == 0
            return data
        try:
            if not self.buffer:
                self._fill(deadline)
        except EOFError:
            self.ended = True
            return b""
        data, self.buffer = self.buffer, b""
        return data

    def next_block(self, deadline):
        """The next SSE block (event, comment or retry) as a dict of fields."""
        while "\n\n" not in self.text:
            if self.ended:
                return None
            piece = self.read_body_piece(deadline)
            self.raw_body += piece
            self.text += piece.decode("utf-8")
        block, _, self.text = self.text.partition("\n\n")
        fields = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name or "comment"] = value[1:] if value.startswith(" ") else value
        return fields

    def _read_last_chunk(self, end_within):
        if end_within is None:
            assert self.read_chunk(time.monotonic() + TIMEOUT) == b"", \
                "no last chunk after terminal"
            return
        deadline = time.monotonic() + end_within
        for _ in range(1000):
            chunk = self.read_chunk(deadline)
            if chunk == b"":
                return
            assert chunk == b": keepalive\n\n", "after the terminal event: %r" % chunk

    def blocks(self, timeout=TIMEOUT, limit=100000):
        """Every block (event, comment or retry) until the body ends, each
        with the time it was read as "received"."""
        deadline = time.monotonic() + timeout
        found = []
        for _ in range(limit):
            block = self.next_block(deadline)
            if block is None:
                break
            block["received"] = time.time()
            found.append(block)
        return found

    def events(self, timeout=TIMEOUT, end_within=None):
        """Every event until the terminal one, and the end of the body: at
        once, or (with `end_within`) after keepalive comments for at most
        that many seconds."""
        deadline = time.monotonic() + timeout
        found = []
        for _ in range(100000):
            block = self.next_block(deadline)
            if block is None:
                break
            if "event" in block:
                block["json"] = json.loads(block["data"])
                found.append(block)
                if block["event"] in ("complete", "cancelled", "error"):
                    if self.chunked:
                        self._read_last_chunk(end_within)
                    break
        return found


def ids(events):
    return [int(e["id"]) for e in events]


def started(events):
    """A --job or --cmd run's events after its first, the server's own
    iteration 0 (the built-in job's is its own, with its total)."""
    assert events[0]["event"] == "progress", events[0]
    assert (events[0]["json"]["iteration"], events[0]["json"]["total"]) == (0, None)
    return events[1:]


def names(events):
    return [e["event"] for e in events]


def thread_count():
    return threading.active_count()


def fd_count():
    """This process's open descriptors (Linux's /proc), or 0 where it cannot tell."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


###############################################################################
# The command line, in a subprocess
###############################################################################

SSE_DEMO = os.path.join(HERE, "sse_demo.py")


class Cli:
    """`python sse_demo.py --port 0 ...` in a subprocess, killed if it hangs."""

    def __init__(self, *args, cwd=None, preexec_fn=None, code=None, extra_env=None, limit=30):
        # --port 0 first: a later --port in `args` wins (argparse keeps the last)
        command = ([sys.executable, SSE_DEMO, "--port", "0"] if code is None
                   else [sys.executable, "-c", code])
        env = {k: v for k, v in os.environ.items() if k != "SSE_DEMO_TOKEN"}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            command + list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, preexec_fn=preexec_fn, env=env)
        self.killer = threading.Timer(limit, self.proc.kill)     # seconds it may live
        self.killer.start()
        self.first_line = self.proc.stdout.readline()
        match = re.search(r"https?://[^/\s]+:(\d+)/", self.first_line)
        self.port = int(match.group(1)) if match else None

    def stop(self, sig=signal.SIGTERM, timeout=5):
        """Signal it; (exit status, seconds to exit, stderr)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        finally:
            self.killer.cancel()
        took = time.monotonic() - started
        return self.proc.returncode, took, self.proc.stderr.read()

    def finish(self, timeout=10):
        """For a process that exits by itself: (status, stdout, stderr)."""
        try:
            out = self.proc.stdout.read()   # its first line is already in this buffer
            err = self.proc.stderr.read()
            self.proc.wait(timeout)
        finally:
            self.killer.cancel()
        return self.proc.returncode, self.first_line + out, err

###############################################################################
# A real browser: headless Chromium over the DevTools protocol
###############################################################################

def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def need(what, found):
    """Skip when a real part is missing, except under CI=true, where it fails."""
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("%s is missing, and CI must run these tests" % what)
    pytest.skip("%s is not installed" % what)


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe: it reads
    NUL-terminated JSON commands on fd 3 and answers on fd 4."""

    def __init__(self, executable):
        self.profile = tempfile.mkdtemp(prefix="sse-demo-browser-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def place_pipes():   # in the child: the pipes become fds 3 and 4
            high_r, high_w = os.dup(to_browser_r) + 100, os.dup(from_browser_w) + 100
            os.dup2(to_browser_r, high_r)
            os.dup2(from_browser_w, high_w)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)
        self.proc = subprocess.Popen(
            [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--ignore-certificate-errors",
             "--user-data-dir=" + self.profile, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=place_pipes, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()   # guards _answers, events
        self._answers = {}
        self.events = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buffer = b""
        while True:
            try:
                data = os.read(self._from_browser, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw.decode("utf-8"))
                with self._cond:
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def call(self, method, session=None, timeout=TIMEOUT, **params):
        number = next(self._ids)
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while number not in self._answers:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise AssertionError("no answer to %s" % method)
                self._cond.wait(remaining)
            answer = self._answers.pop(number)
        if "error" in answer:
            raise AssertionError("%s failed: %s" % (method, answer["error"]))
        return answer["result"]

    def new_page(self, isolated=False, window=False):
        """A tab; `isolated` gives it a browser context of its own (its own
        storage and cookies: another person's browser); `window` a window of
        its own, so that it stays visible beside the others (a new tab in
        the same window hides the one before)."""
        options = {"newWindow": True} if window else {}
        if isolated:
            options["browserContextId"] = self.call("Target.createBrowserContext")[
                "browserContextId"]
        target = self.call("Target.createTarget", url="about:blank", **options)["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable", session=session)
        return Page(self, session)

    def close(self):
        try:
            self.call("Browser.close", timeout=3)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab of a Browser."""

    def __init__(self, browser, session):
        self.browser = browser
        self.session = session

    def call(self, method, timeout=TIMEOUT, **params):
        return self.browser.call(method, session=self.session, timeout=timeout, **params)

    def new_page(self):
        """Another person's tab: a new browser context, no shared storage."""
        return self.browser.new_page(isolated=True)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("page script failed: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    # What Chromium answers when a navigation (a sign-in's redirect, say)
    # replaces the page between two looks: the next look sees the new page.
    NAVIGATING = ("Inspected target navigated or closed", "Execution context was destroyed",
                  "Cannot find context with specified id")

    def wait_for(self, expression, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            try:
                value = self.evaluate(expression)
            except AssertionError as exc:
                if not any(reason in str(exc) for reason in self.NAVIGATING):
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s (state %r)"
                             % (expression, self.element("status", "dataset.state")))

    def element(self, element_id, prop="textContent"):
        """A property of the element with this id."""
        return self.evaluate("document.getElementById(%s).%s" % (json.dumps(element_id), prop))

    def click(self, element_id):
        self.evaluate("document.getElementById(%s).click()" % json.dumps(element_id))

    def log_lines(self, progress=False):
        """The page's log, newest first, one string per line; with
        `progress`, the progress events too (the page's toggle). Lines
        drawn so far: it waits for the page's next frame to draw the lines
        it has received (a state shows at once, its log line a frame later)."""
        self.wait_for("unshownLines.length === 0")
        if progress:
            self.evaluate("(() => { const box = document.getElementById('log-progress');"
                          "if (!box.checked) box.click(); })()")
            self.wait_for("!document.getElementById('log-progress').checked || "
                          "document.querySelectorAll('#log li.progress').length > 0")
        return self.evaluate("[...document.querySelectorAll('#log li')].reverse().map(li => "
                             "[...li.children].map(s => s.textContent).join(' '))")

    READY = "document.readyState === 'complete' && document.body.dataset.job === 'loaded'"

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait_for(self.READY)

    def reload(self):
        """Reload, and wait for the new document (not the old one's state)."""
        self.evaluate("window.oldDocument = true")
        self.call("Page.reload")
        self.wait_for("!window.oldDocument && " + self.READY)

    def problems(self):
        """Console errors, uncaught exceptions and CSP violations so far."""
        found = []
        with self.browser._cond:
            events = [e for e in self.browser.events if e.get("sessionId") == self.session]
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"].get("text"))
        return found

    def screenshot(self, path, width, height):
        self.call("Emulation.setDeviceMetricsOverride", width=width,
                  height=height, deviceScaleFactor=1, mobile=width < 500)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def page_url(srv):
    return "%s://127.0.0.1:%d/" % ("https" if getattr(srv, "client_tls", None) else "http",
                                   srv.port)


def start_in_page(browser, **params):
    """Fill the page's generated form and press Start."""
    browser.evaluate("""(() => {
        document.getElementById('advanced').open = true;
        for (const [name, value] of Object.entries(%s)) {
            const input = document.getElementById('param-' + name);
            if (input.type === 'checkbox') input.checked = value; else input.value = String(value);
        }
        document.getElementById('start').click(); })()""" % json.dumps(params))


STATE = "state"          # the page's state (its status shows the run's, its indicator the connection's)


def png_is_not_blank(path):
    """Decode the PNG's pixel rows (stdlib zlib) and look for variety."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, offset = b"", 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    pixels = zlib.decompress(idat)
    return width, height, len(set(pixels[::97]))


###############################################################################
# Real proxies: nginx and Pushpin
###############################################################################

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the process exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("port %d did not open" % port)


class Proxy:
    """A port that talks HTTP, for the helpers above."""

    def __init__(self, port):
        self.port = port


def readme_block(language, starts=""):
    """The first ```language block of README.md that starts with `starts`."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return re.search(r"```%s\n(%s.*?)```" % (language, re.escape(starts)), f.read(),
                         re.S).group(1)


def stop_process(proc, timeout=5):
    """Terminate, then kill if it does not go; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class Pushpin:
    """A real Pushpin on free ports, from a config generated in a folder."""

    KEY = "test-sig-key"

    def __init__(self, folder, upstream_port, http_port=None, publish_port=None):
        self.folder = folder
        self.port = http_port or free_port()
        self.publish_port = publish_port or free_port()
        for name in ("run", "log"):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
        routes = readme_block("", "# routes").strip().splitlines()[-1].replace(
            "127.0.0.1:5000", "127.0.0.1:%d" % upstream_port)
        with open(os.path.join(folder, "routes"), "w") as f:
            f.write(routes + "\n")
        config = readme_block("ini", "# pushpin.conf")     # the README's own recipe
        for old, new in (("/tmp/pushpin", folder), ("http_port=7999", "http_port=%d" % self.port),
                         ("push_in_http_port=5561", "push_in_http_port=%d" % self.publish_port),
                         ("sig_key=changeme", "sig_key=" + self.KEY)):
            assert old in config, old
            config = config.replace(old, new)
        with open(os.path.join(folder, "pushpin.conf"), "w") as f:
            f.write(config)
        self.proc = subprocess.Popen(
            ["pushpin", "--config", os.path.join(folder, "pushpin.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, self.proc, timeout=20)
        wait_for_port(self.publish_port, self.proc, timeout=20)
        wait_for(self._routes_requests, timeout=20, what="Pushpin to route requests")

    def _routes_requests(self):
        """Its port opens before all its parts are up: ready is a request
        that makes it through to the server."""
        try:
            return request(self, "GET", "/healthz")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_pushpin(folder, token=None):
    """A server in --grip mode and a real Pushpin in front of it, ready to
    hold streams: (proxy, upstream). With `token`, the server asks for it."""
    need("pushpin", shutil.which("pushpin"))
    publish_port = free_port()
    # A long idle timeout: Pushpin reuses its upstream connections and does not
    # retry a GET on one that the server closed as idle in the same instant.
    upstream = Running(keepalive_s=1.0, grip="http://127.0.0.1:%d" % publish_port,
                       grip_key=Pushpin.KEY, request_timeout_s=60, token=token)
    auth = {"Authorization": "Bearer " + token} if token else {}
    try:
        proxy = Pushpin(folder, upstream.port, publish_port=publish_port)
    except BaseException:
        upstream.stop()
        raise
    try:
        # Ready means a stream can be held, which takes all of Pushpin's parts
        status, _, body = request(upstream, "POST", "/start", headers=auth,
                                  json_body={"iterations": 2, "tick": 60})
        assert status == 201, body
        probe, probe_key = json.loads(body)["session_id"], json.loads(body)["control_key"]

        def holds_a_stream():
            try:     # a request Pushpin took while starting may never be answered
                stream = Stream(proxy, "/progress/" + probe, auth, head_timeout=1.0)
            except (OSError, EOFError):
                return False
            stream.close()
            return stream.status == 200
        wait_for(holds_a_stream, timeout=20, what="Pushpin to hold a stream")
        cancel(upstream, probe, key=probe_key)
    except BaseException:
        proxy.stop()
        upstream.stop()
        raise
    return proxy, upstream


PUSHPIN_TOKEN = "the-operators-token-behind-pushpin"
PATH_TOKEN = "the-operators-token-under-a-path"


###############################################################################
# pytest's fixtures: servers, a browser, nginx and Pushpin, always stopped
###############################################################################
@pytest.fixture(scope="module")
def server():
    running = Running()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make():
    """Start servers with particular options; all are stopped afterwards."""
    started = []

    def start(**options):
        running = Running(**options)
        started.append(running)
        return running
    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, made by the
    README's own `openssl req` command: (certfile, keyfile)."""
    need("openssl", shutil.which("openssl"))
    folder = tmp_path_factory.mktemp("tls")
    command = readme_block("sh", "openssl req").split("\npython3")[0].replace("\\\n", " ")
    command = command.replace("DNS:buildbox", "IP:127.0.0.1").replace("buildbox", "127.0.0.1")
    subprocess.run(shlex.split(command), cwd=str(folder), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    return str(folder / "cert.pem"), str(folder / "key.pem")


@pytest.fixture
def browser():
    executable = need("a Chromium browser (chromium, chromium-browser or google-chrome)",
                      find_browser())
    driver = Browser(executable)
    try:
        yield driver.new_page()
    finally:
        driver.close()
        assert driver.proc.poll() is not None      # closed and reaped


NGINX_CONF = """
daemon off;
master_process off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 256; }
http {
    log_format requests "$request_method $request_uri $status";
    access_log %(dir)s/access.log requests;
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    server {
        listen 127.0.0.1:%(port)d;
        %(blocks)s
    }
}
"""


def start_nginx(tmp_path, upstream, blocks):
    """A real nginx in `tmp_path` with the README's `blocks` (their upstream
    made `upstream`'s port), logging each request to access.log: (its
    process, its port)."""
    executable = need("nginx", shutil.which("nginx") or
                      (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx"))
    port = free_port()
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / name).mkdir()
    (tmp_path / "nginx.conf").write_text(NGINX_CONF % {
        "dir": tmp_path, "port": port,
        "blocks": blocks.replace("127.0.0.1:5000", "127.0.0.1:%d" % upstream.port)})
    proc = subprocess.Popen([executable, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """A real nginx with the README's location block, in front of a server;
    one per test module."""
    upstream = Running(keepalive_s=0.3)
    try:
        proc, port = start_nginx(tmp_path_factory.mktemp("nginx"), upstream,
                                 readme_block("nginx"))
    except BaseException:
        upstream.stop()
        raise
    try:
        yield Proxy(port), upstream
    finally:
        stop_process(proc)
        upstream.stop()


@pytest.fixture(scope="module")
def nginx_under_a_path(tmp_path_factory):
    """A real nginx with the README's `location /jobs/` block (and nothing
    else at /), in front of a server that asks for a token: (proxy,
    upstream, the access log's path)."""
    tmp_path = tmp_path_factory.mktemp("nginx-path")
    upstream = Running(keepalive_s=0.3, token=PATH_TOKEN)
    try:
        proc, port = start_nginx(tmp_path, upstream, "location / { return 404; }\n" +
                                 readme_block("nginx", "location /jobs/"))
    except BaseException:
        upstream.stop()
        raise
    try:
        yield Proxy(port), upstream, str(tmp_path / "access.log")
    finally:
        stop_process(proc)
        upstream.stop()


@pytest.fixture(scope="module")
def pushpin(tmp_path_factory):
    """Pushpin with the README's configuration, one per test module."""
    proxy, upstream = start_pushpin(str(tmp_path_factory.mktemp("pushpin")))
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


@pytest.fixture
def pushpin_with_token(tmp_path):
    """Pushpin in front of a server that asks for a token (the tests' TOKEN)."""
    proxy, upstream = start_pushpin(str(tmp_path), token=PUSHPIN_TOKEN)
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


@pytest.fixture
def fresh_pushpin(tmp_path):
    """A Pushpin of this test's own, for a test that stops it."""
    proxy, upstream = start_pushpin(str(tmp_path))
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


###############################################################################
# Markers: tests that need a real browser or a real proxy
###############################################################################

REAL_PARTS = {"browser": "browser", "nginx": "proxy", "nginx_under_a_path": "proxy",
              "pushpin": "proxy", "fresh_pushpin": "proxy",
              "pushpin_with_token": "proxy"}


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a real headless Chromium")
    config.addinivalue_line("markers", "proxy: runs behind a real nginx or Pushpin")


def pytest_collection_modifyitems(items):
    """Mark each test by the real parts its fixtures start, so CI selects
    with -m, whatever the tests are called."""
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            if fixture in REAL_PARTS:
                item.add_marker(REAL_PARTS[fixture])
