"""pytest's fixtures for test_sse_demo.py, built on harness.py: servers
that are always stopped, a real browser, nginx and Pushpin that are always
reaped, and the markers that let CI select the tests that need them."""

import os
import shlex
import shutil
import subprocess

import pytest

from harness import (PATH_TOKEN, PUSHPIN_TOKEN, Browser, Proxy, Running, find_browser, free_port,
                     need, readme_block, start_pushpin, stop_process, wait_for_port)


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
