#!/usr/bin/env python3
"""How well the page keeps up: frame gaps in headless Chromium while a run
streams at a given event rate, how long a Cancel click takes to cancel the
run on the server and to show on the page, and how long a page opened on a
finished run takes to draw it.

    python3 bench/page_frames.py                      # 100 to 20,000 events/s, and "max"
    python3 bench/page_frames.py --rates 1000 --seconds 10
    python3 bench/page_frames.py --logs 2             # every 2nd event a log line
    python3 bench/page_frames.py --log-flood --rates 1000,max --seconds 15
    python3 bench/page_frames.py --checkout /tmp/old  # another checkout's server and page

A rate runs the built-in job with `tick` = 1/rate and `update_every=1`;
"max" with `tick=0`, as fast as it goes. With `--logs N` the server runs
`flood` below instead (`--job page_frames:flood`), which publishes at the
rate with every Nth event a log line. With `--log-flood` it runs a program
(`--cmd`, this file's `print_lines`) that writes `rate` lines a second
("max": 5,000 at a time, as fast as it goes), which the server joins into
log events of many lines each, as it does any program's flood.

Needs Debian's `chromium` and pytest (it drives the browser with the tests'
DevTools driver in conftest.py). Everything stays on loopback.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

def flood(progress, rate=20000, seconds=60, log_every=2, cancel=None):
    """Publish `rate` events a second for `seconds`: progress events with a
    field, and every `log_every`th a log line instead."""
    total, started = int(rate * seconds), time.monotonic()
    for i in range(total):
        if i % log_every == 0:
            progress.log("line %d: the quick brown fox jumps over the lazy dog" % i)
        else:
            progress(i, total, loss=1.0 / (i + 1))
        if cancel.wait(max(0.0, started + (i + 1) / rate - time.monotonic())):
            return None

def print_lines(rate, seconds):
    """--log-flood's program: a log format's lines, `rate` a second ("max":
    5,000 a write, as fast as it goes), for `seconds`."""
    line = "%s INFO worker-%d handled request %d in %d ms status=200\n"
    started, written = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        batch = 5000 if rate == "max" else 1
        sys.stdout.write("".join(line % (time.strftime("%H:%M:%S"), k % 8, k, k % 97)
                                 for k in range(written, written + batch)))
        sys.stdout.flush()
        written += batch
        if rate != "max":
            time.sleep(max(0.0, started + written / float(rate) - time.monotonic()))


RECORD_FRAMES = """(() => {
    window.benchGaps = [];
    let last = performance.now();
    const tick = (now) => { window.benchGaps.push(now - last); last = now;
                            if (!window.benchStop) requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
})()"""


def post(base, path, data=None, headers=None):
    request = urllib.request.Request(base + path, data=data, method="POST", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=10) as answer:
        return json.loads(answer.read())


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def wait(page, expression, timeout=30.0, step=0.01):
    """Poll an expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(step)
    raise RuntimeError("timed out waiting for " + expression)


def measure_rate(page, base, rate, seconds, logs, flood=False):
    """Start a run at `rate` events/s ("max": as fast as it goes) from the
    page, record frame gaps for `seconds`, then click Cancel and time it."""
    if flood:
        params = {"rate": rate, "seconds": seconds * 4}
    elif logs:
        params = {"rate": rate, "seconds": seconds * 4, "log_every": logs}
    else:
        params = {"iterations": int((rate if rate != "max" else 100000) * seconds * 4),
                  "tick": 0 if rate == "max" else 1.0 / rate, "update_every": 1}
    page.call("Page.navigate", url=base + "/")
    wait(page, "document.readyState === 'complete' && document.body.dataset.job === 'loaded'")
    page.evaluate(RECORD_FRAMES)
    page.evaluate("""(() => {
        for (const [name, value] of Object.entries(%s)) document.getElementById('param-' + name).value = value;
        document.getElementById('start').click(); })()""" % json.dumps(params))
    sid = wait(page, "(/#session=([A-Za-z0-9_-]+)/.exec(location.hash) || [])[1]")
    if flood:       # the log in view, as whoever watches a flood has it
        page.evaluate("document.getElementById('log-section').scrollIntoView()")
    started = time.monotonic()
    page.evaluate("window.benchGaps = []")
    time.sleep(seconds)
    gaps = page.evaluate("window.benchGaps")
    status = get(base, "/status/" + sid)
    published = status.get("iteration", 0) / max(1e-9, time.monotonic() - started)
    shown = page.evaluate("seenId")
    # The click goes through Chromium's input pipeline, like a person's.
    box = page.evaluate("(() => { window.scrollTo(0, 0); const r = document.getElementById('cancel')"
                        ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    clicked = time.monotonic()
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                  clickCount=1)
    reached = None
    for _ in range(2000):
        if get(base, "/status/" + sid)["state"] != "running":
            reached = time.monotonic() - clicked
            break
        time.sleep(0.002)
    try:
        wait(page, "document.getElementById('status').dataset.state === 'cancelled'", step=0.005)
        shown_after = time.monotonic() - clicked
    except (RuntimeError, AssertionError):   # the page did not catch up within the limit
        shown_after = None
    page.evaluate("window.benchStop = true")
    return {"rate": rate, "published/s": None if flood else round(published), "frames": len(gaps),
            "p50 ms": round(percentile(gaps, 0.5), 1), "p95 ms": round(percentile(gaps, 0.95), 1),
            "max ms": round(max(gaps) if gaps else float("nan"), 1),
            "gaps > 100 ms": sum(1 for g in gaps if g > 100),
            "cancel on server ms": round(reached * 1000) if reached is not None else None,
            "Cancelled shown ms": round(shown_after * 1000) if shown_after is not None else None,
            "page behind (events)": max(0, status.get("iteration", 0) - shown)}


def measure_open(page, base, events):
    """A finished run of `events` events, opened in a fresh page: ms until
    its last event is handled and its chart drawn."""
    sid = post(base, "/start?iterations=%d&tick=0&update_every=1" % (events - 1))["session_id"]
    for _ in range(500):
        if get(base, "/status/" + sid)["state"] != "running":
            break
        time.sleep(0.01)
    page.call("Page.navigate", url="about:blank")
    page.call("Page.navigate", url=base + "/#session=" + sid)
    done = wait(page, "typeof seenId !== 'undefined' && seenId >= %d && "
                      "!!document.querySelector('#chart path.series') && "
                      "document.getElementById('status').dataset.state === 'complete' && "
                      "performance.now()" % events, step=0.005)
    return round(done)


def main():
    # Here, not at the top: the server imports this file for `flood`
    from conftest import Browser, find_browser, free_port, stop_process
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,1000,5000,20000,max")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--logs", type=int, default=0, metavar="N",
                        help="run `flood`: every Nth event a log line")
    parser.add_argument("--log-flood", action="store_true",
                        help="a program that writes RATE lines a second (see print_lines)")
    parser.add_argument("--checkout", default=os.path.dirname(HERE),
                        help="the folder whose sse_demo.py and index.html to measure")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    executable = find_browser()
    if not executable:
        sys.exit("needs Debian's chromium")
    port = free_port()
    job = ["--job", "page_frames:flood"] if args.logs else []
    if args.log_flood:
        job = ["--cmd", "%s %s --print-lines {rate=max} {seconds=60}" % (sys.executable, os.path.abspath(__file__))]
    server = subprocess.Popen([sys.executable, os.path.join(args.checkout, "sse_demo.py"),
                               "--port", str(port), "--log-level", "warning"] + job,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    base = "http://127.0.0.1:%d" % port
    browser = Browser(executable)
    results = {"rates": [], "open ms": []}
    try:
        for _ in range(200):
            try:
                get(base, "/healthz")
                break
            except OSError:
                time.sleep(0.05)
        page = browser.new_page()
        page.call("Emulation.setDeviceMetricsOverride", width=1280, height=800,
                  deviceScaleFactor=1, mobile=False)
        for rate in args.rates.split(","):
            rate = rate if rate == "max" else float(rate)
            results["rates"].append(measure_rate(page, base, rate, args.seconds, args.logs,
                                                 args.log_flood))
            print(json.dumps(results["rates"][-1]), flush=True)
        for _ in range(0 if args.logs or args.log_flood else 3):
            results["open ms"].append(measure_open(page, base, 1000))
        if results["open ms"]:
            print(json.dumps({"open a 1,000-event run, ms": results["open ms"],
                              "median": statistics.median(results["open ms"])}), flush=True)
    finally:
        browser.close()
        stop_process(server)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--print-lines"]:
        print_lines(sys.argv[2] if sys.argv[2] == "max" else float(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
