"""The web dashboard end to end: `conduit dashboard` serving a real broker, worker and PostgreSQL,
driven by a real headless Chromium (Debian's, through Playwright; no browser download).

Without the token nothing is served; with it, a dead task is found, retried and seen completing
(the page refreshes itself); dead tasks are grouped by error and discarded; a queue is paused
and resumed; and a POST that is not the dashboard's own (no form token, or another origin) is
refused and changes nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import Database, Process, free_port
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_e2e import running, wait_for

from conduit.client import Client, PermanentError, TaskContext, Worker
from conduit.task import TaskSpec

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "test-token-" + "x" * 20
pytestmark = pytest.mark.skipif(  # in CI (which installs it) a missing browser fails instead
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium)",
)


class Dashboard:
    def __init__(self, db: Database, processes: list[Process]) -> None:
        port = free_port()
        self.process = Process(
            ["dashboard", "--bind", f"127.0.0.1:{port}", "--dsn", db.dsn, "--schema", db.schema],
            env={"CONDUIT_DASHBOARD_TOKEN": TOKEN},
        )
        processes.append(self.process)
        assert self.process.proc.stdout is not None
        self.port = port
        self.url = self.process.proc.stdout.readline().strip().rstrip("/")
        assert self.url == f"http://127.0.0.1:{port}", self.process.log()
        wait_for(self._up, what="the dashboard to serve")

    def _up(self) -> bool:
        return self.get("/")[0] == 401

    def get(
        self, path: str, headers: dict[str, str] | None = None, data: bytes | None = None
    ) -> tuple[int, str]:
        return fetch(self.url + path, headers, data)


def fetch(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, str]:
    """Status and body of a plain HTTP request (no browser, no cookie); 0 if nothing answers."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers or {}), timeout=10
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def dashboard(db: Database, processes: list[Process]) -> Dashboard:
    return Dashboard(db, processes)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


def signed_in(browser: Browser, dashboard: Dashboard) -> Page:
    page = browser.new_page()
    answer = page.goto(f"{dashboard.url}/?token={TOKEN}")
    assert answer is not None and answer.status == 200
    assert page.url == f"{dashboard.url}/"  # the token left the address bar
    return page


def test_dashboard_command_checks_its_bind_and_warns_off_loopback(db: Database, processes) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "conduit",
            "dashboard",
            "--bind",
            "8080",
            "--dsn",
            db.dsn,
            "--schema",
            db.schema,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "is not HOST:PORT" in bad.stderr and len(bad.stderr.splitlines()) == 1
    port = free_port()
    wide = Process(["dashboard", "--bind", f"0.0.0.0:{port}", "--dsn", db.dsn, "--schema", db.schema])
    processes.append(wide)
    assert wide.proc.stdout is not None
    url = wide.proc.stdout.readline().strip()
    token = url.partition("?token=")[2]
    assert url.startswith(f"http://0.0.0.0:{port}/?token=") and len(token) >= 32  # made up and printed
    wait_for(lambda: "not a loopback address" in wide.log(), what="the warning")
    wait_for(lambda: fetch(f"http://127.0.0.1:{port}/")[0] == 401, what="the dashboard to serve")
    assert fetch(f"http://127.0.0.1:{port}/", {"Authorization": f"Bearer {token}"})[0] == 200


def test_nothing_is_served_without_the_token(dashboard: Dashboard, db: Database, browser: Browser) -> None:
    with db.store() as store:
        (task,) = store.enqueue([TaskSpec("secretq", b"secret payload")])
    for path in ("/", "/queues/secretq", f"/tasks/{task.id}", "/mesh", "/static/app.js", "/nowhere"):
        status, body = dashboard.get(path)
        assert status == 401 and "secret" not in body, path
        assert dashboard.get(path, {"Cookie": f"conduit_session_{dashboard.port}=forged.abc"})[0] == 401
        assert dashboard.get(path, {"Authorization": "Bearer wrong"})[0] == 401
    assert dashboard.get("/?token=wrong")[0] == 401
    assert dashboard.get("/actions/pause", data=b"queue=secretq")[0] == 401
    with db.store() as store:
        assert store.paused() == {}
    status, body = dashboard.get("/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "secretq" in body  # a script may use the header

    page = browser.new_page()
    answer = page.goto(f"{dashboard.url}/queues/secretq")
    assert answer is not None and answer.status == 401 and "secret" not in page.content()
    page.goto(f"{dashboard.url}/?token={TOKEN}")
    expect(page.get_by_role("link", name="secretq")).to_be_visible()
    (cookie,) = page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict") and TOKEN not in cookie["value"]
    page.goto(f"{dashboard.url}/tasks/{task.id}")
    expect(page.locator("pre").filter(has_text="secret payload").first).to_be_visible()


def test_open_a_dead_task_retry_it_and_see_it_complete(
    start_broker, dashboard: Dashboard, db: Database, browser: Browser
) -> None:
    broker = start_broker("--pub", "tcp://127.0.0.1:0", broker_id="dash-b1")
    healthy = threading.Event()
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0, worker_id="dash-worker")

    @worker.handler("dashq")
    def handle(task: TaskContext) -> bytes:
        if task.payload.startswith(b"other"):
            raise PermanentError("another failure")
        if not healthy.is_set():
            raise PermanentError("boom: the service is down")
        return b'{"sent": true}'

    with Client(broker.endpoint) as client, running(worker):
        dead = client.submit("dashq", b'{"to": "a@b.c"}')
        others = [client.submit("dashq", b"other %d" % i) for i in range(2)]
        for task_id in (dead, *others):
            assert client.result(task_id, timeout=30).state == "dead"

        page = signed_in(browser, dashboard)
        page.get_by_role("link", name="dashq").click()
        expect(page.locator("h1")).to_have_text("Queue dashq")
        page.locator(".tabs a", has_text="dead").click()
        rows = page.locator("table.tasks tbody tr")
        expect(rows).to_have_count(3)
        page.get_by_role("link", name=str(dead), exact=True).click()
        expect(page.locator("#task-state")).to_have_text("dead")
        expect(page.locator("pre.error")).to_contain_text("boom: the service is down")
        expect(page.locator(".views pre").first).to_contain_text('"to": "a@b.c"')  # the JSON view

        healthy.set()
        page.get_by_role("button", name="Retry").click()
        expect(page.locator(".done")).to_have_text("retried 1 task")
        # no reload: the page's live part refreshes itself until the worker has run it
        expect(page.locator("#task-state")).to_have_text("completed", timeout=30_000)
        expect(page.get_by_role("heading", name="Result 14 bytes")).to_be_visible()
        assert client.lookup([dead])[0].state == "completed"

        page.goto(f"{dashboard.url}/queues/dashq/dead")  # grouped by error: the two others
        group = page.locator("section.group")
        expect(group).to_have_count(1)
        expect(group).to_contain_text("another failure")
        page.once("dialog", lambda dialog: dialog.accept())
        group.get_by_role("button", name="Discard 2 (drop for good)").click()
        expect(page.locator(".done")).to_have_text("discarded 2 of 2 dead tasks")
        expect(page.locator("section.group")).to_have_count(0)
        assert [i.state for i in client.lookup(others)] == [None, None]

        page.goto(f"{dashboard.url}/mesh")  # brokers and workers, live
        expect(page.locator("table").first).to_contain_text("dash-b1")
        expect(page.locator("table").nth(1)).to_contain_text("dash-worker")
        expect(page.locator("table").nth(1)).to_contain_text("dashq")


def test_pause_and_resume_a_queue(dashboard: Dashboard, db: Database, browser: Browser) -> None:
    with db.store() as store:
        store.enqueue([TaskSpec("pauseq", b"x")])
    page = signed_in(browser, dashboard)
    row = page.locator("tr", has=page.get_by_role("link", name="pauseq"))
    row.get_by_role("button", name="Pause").click()
    expect(page.locator(".done")).to_have_text("paused pauseq")
    expect(row.locator(".badge")).to_have_text("paused")
    with db.store() as store:
        assert list(store.paused()) == ["pauseq"]
    row.get_by_role("button", name="Resume").click()
    expect(page.locator(".done")).to_have_text("resumed pauseq")
    expect(row.locator(".badge")).to_have_count(0)
    with db.store() as store:
        assert store.paused() == {}


@pytest.mark.skipif(
    importlib.util.find_spec("conduit.broker.pauses") is None,
    reason="brokers honor paused queues once the broker's pause support is merged",
)
def test_a_paused_queue_gets_no_deliveries_until_resumed(
    start_broker, dashboard: Dashboard, db: Database, browser: Browser
) -> None:
    broker = start_broker()
    ran: list[bytes] = []
    worker = Worker(broker.endpoint, concurrency=2, poll_timeout=1.0, worker_id="pause-worker")

    @worker.handler("pausing")
    def handle(task: TaskContext) -> bytes:
        ran.append(task.payload)
        return b"ok"

    with Client(broker.endpoint) as client, running(worker):
        assert client.result(client.submit("pausing", b"first"), timeout=30).state == "completed"
        page = signed_in(browser, dashboard)
        page.goto(f"{dashboard.url}/queues/pausing")
        page.get_by_role("button", name="Pause").click()
        expect(page.locator("h1 .badge")).to_have_text("paused")
        page.wait_for_timeout(1500)  # every broker stops delivering it within a second
        held = [client.submit("pausing", b"held %d" % i) for i in range(3)]  # still accepted
        page.wait_for_timeout(3000)
        assert ran == [b"first"] and {i.state for i in client.lookup(held)} <= {"pending", "buffered"}
        page.get_by_role("button", name="Resume").click()
        expect(page.locator(".done")).to_have_text("resumed pausing")
        for task_id in held:
            assert client.result(task_id, timeout=30).state == "completed"
        assert sorted(ran) == [b"first", b"held 0", b"held 1", b"held 2"]


class _Foreign(BaseHTTPRequestHandler):
    """Another origin's page that posts to the dashboard by itself (a cross-site request)."""

    form = ""

    def do_GET(self) -> None:
        body = self.form.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_posts_without_the_form_token_or_from_elsewhere_are_refused(
    dashboard: Dashboard, db: Database, browser: Browser
) -> None:
    with db.store() as store:
        store.enqueue([TaskSpec("csrfq", b"x")])
    page = signed_in(browser, dashboard)  # the browser has the session cookie
    form = page.locator("form", has=page.get_by_role("button", name="Pause")).first
    csrf = form.locator("input[name=csrf]").get_attribute("value")
    assert csrf and len(csrf) == 32

    # from the dashboard's own origin, with the cookie, but no form token or a wrong one
    for data in ({"queue": "csrfq"}, {"queue": "csrfq", "csrf": "0" * 32}):
        answer = page.request.post(f"{dashboard.url}/actions/pause", form=data, max_redirects=0)
        assert answer.status == 403 and "nothing was done" in answer.text()

    # another origin's page posting the right form token: its Origin gives it away
    _Foreign.form = (
        f'<form method="post" action="{dashboard.url}/actions/pause">'
        f'<input name="csrf" value="{csrf}"><input name="queue" value="csrfq"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        with page.expect_response(f"{dashboard.url}/actions/pause") as posted:
            page.goto(f"http://127.0.0.1:{foreign.server_address[1]}/")
        assert posted.value.status == 403
    finally:
        foreign.shutdown()
        foreign.server_close()
    with db.store() as store:
        assert store.paused() == {}  # none of them changed anything

    page.goto(f"{dashboard.url}/")  # the dashboard's own form, with its token, does it
    page.locator("form", has=page.get_by_role("button", name="Pause")).first.get_by_role("button").click()
    expect(page.locator(".done")).to_have_text("paused csrfq")


def test_tasks_page_by_keyset_and_cancel_and_purge(
    dashboard: Dashboard, db: Database, browser: Browser
) -> None:
    with db.store() as store:
        ids = [s.id for s in store.enqueue([TaskSpec("pageq", b"%d" % i) for i in range(60)])]
    page = signed_in(browser, dashboard)
    page.goto(f"{dashboard.url}/queues/pageq?state=pending")
    rows = page.locator("table.tasks tbody tr")
    expect(rows).to_have_count(50)  # a page, in the order they will run
    first = [int(t) for t in rows.locator("td:first-child").all_inner_texts()]
    page.get_by_role("link", name="next page").click()
    expect(rows).to_have_count(10)
    rest = [int(t) for t in rows.locator("td:first-child").all_inner_texts()]
    assert first + rest == ids
    expect(page.get_by_role("link", name="next page")).to_have_count(0)

    rows.first.get_by_role("button", name="Cancel").click()  # from the second page
    expect(page.locator(".done")).to_have_text("cancelled 1 task")
    expect(rows).to_have_count(9)  # back on the same page, less the cancelled task
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Purge (cancel what has not started)").click()
    expect(page.locator(".done")).to_have_text("purged 59 tasks of pageq")
    with db.store() as store:
        assert store.queue_stats()["pageq"] == {"cancelled": 60}
