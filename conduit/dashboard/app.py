"""The dashboard's pages and actions: a Starlette app rendering Jinja2 templates on the server.

Every page reads the Store's own operations through one `Observer` (counters, keyset listings,
`show`), so the dashboard costs the database what `conduit queues` and `conduit tasks` do, and
never a COUNT over a backlog. A page asked with `X-Conduit-Live: 1` (app.js, every 2 s) gets only
its live part, which the script swaps in. Actions are POSTs checked by `security.action_form`,
answered by a redirect back (303) with what was done.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from conduit.dashboard import charts
from conduit.dashboard.preview import preview
from conduit.dashboard.security import Guard, Refused, TokenGate, action_form
from conduit.errors import ConduitError, DatabaseError
from conduit.observe import HISTORY_SECONDS, Observer
from conduit.task import FINAL_STATES, STATES

SAMPLE_EVERY = 2.0  # seconds between counter readings (the charts' rates)
BINS = 90  # points in a 15-minute chart: one per 10 s
PAGE = 50
DEAD_GROUPED = 1000  # the newest dead tasks grouped by error on a queue's dead page


def create_app(observer: Observer, token: str, *, sample_every: float = SAMPLE_EVERY) -> Starlette:
    guard = Guard(token)
    env = Environment(loader=PackageLoader("conduit.dashboard", "templates"), autoescape=select_autoescape())
    env.filters["n"] = lambda value: "-" if value is None else f"{value:,}"
    env.filters["rate"] = lambda value: "-" if value is None else f"{value:,.1f}"
    env.filters["ms"] = lambda value: "-" if value is None else f"{value * 1000:,.1f}"
    env.filters["when"] = lambda moment: "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")
    problems: list[str] = []  # the sampler's last failure, shown on every page

    async def render(request: Request, page: str, status: int = 200, /, **values: Any) -> Response:
        template = env.get_template(page)
        context = {
            "request": request,
            "csrf": guard.csrf_for(request.state.session),
            "here": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            "done": request.query_params.get("done"),
            "problems": problems,
            **values,
        }
        if request.headers.get("x-conduit-live") == "1":
            live = template.blocks["live"](template.new_context(context))
            return HTMLResponse("".join(live), status)
        return HTMLResponse(template.render(context), status)

    async def read(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(function, *args, **kwargs)

    def chart_rates(queue: str) -> str:
        values = charts.bins(observer.rate_series(queue), time.monotonic(), HISTORY_SECONDS, BINS)
        return charts.sparkline(values, ("in", "out"), f"{queue}: tasks/s in and out, last 15 minutes")

    def chart_latency(queue: str) -> str:
        title = f"{queue}: start latency p50 and p99, last 15 minutes"
        series = observer.latency_series(queue)
        if not series:
            return charts.unmeasured(title)
        values = charts.bins(
            [(t, p50 * 1000, p99 * 1000) for t, p50, p99 in series], time.monotonic(), HISTORY_SECONDS, BINS
        )
        return charts.sparkline(values, ("p50", "p99"), title, unit=" ms")

    async def queues_page(request: Request) -> Response:
        rows = await read(observer.queues, False)
        return await render(
            request,
            "queues.html",
            queues=rows,
            states=STATES,
            charts={q.name: (chart_rates(q.name), chart_latency(q.name)) for q in rows},
        )

    async def queue_page(request: Request) -> Response:
        name = request.path_params["queue"]
        state = request.query_params.get("state") or "pending"
        rows = {q.name: q for q in await read(observer.queues, False)}
        page = await read(
            observer.run,
            "list_tasks",
            queue=name,
            state=state,
            limit=PAGE,
            after=request.query_params.get("after"),
        )
        return await render(
            request,
            "queue.html",
            queue=rows.get(name),
            name=name,
            state=state,
            states=STATES,
            final=FINAL_STATES,
            page=page,
            next_url=f"?{urlencode({'state': state, 'after': page.next})}" if page.next else None,
            rate_chart=chart_rates(name),
            latency_chart=chart_latency(name),
        )

    async def dead_page(request: Request) -> Response:
        name = request.path_params["queue"]
        page = await read(observer.run, "list_tasks", queue=name, state="dead", limit=DEAD_GROUPED)
        groups: dict[str, list[Any]] = {}
        for row in page.rows:
            groups.setdefault((row.error or "(no error)").splitlines()[0][:300], []).append(row)
        ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
        return await render(
            request, "dead.html", name=name, groups=ordered, more=page.next is not None, limit=DEAD_GROUPED
        )

    async def task_page(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        found = await read(observer.run, "show", [task_id])
        if not found:
            return await render(request, "missing.html", 404, task_id=task_id)
        task = found[0]
        views = {
            name: preview(data)
            for name, data in (("payload", task.payload), ("result", task.result))
            if data is not None
        }
        return await render(request, "task.html", task=task, views=views, final=FINAL_STATES)

    async def mesh_page(request: Request) -> Response:
        brokers, workers, trouble = await read(observer.mesh)
        workers = sorted(workers, key=lambda w: (w.worker or "", w.broker))
        return await render(request, "mesh.html", brokers=brokers, workers=workers, trouble=trouble)

    async def act(request: Request) -> Response:
        try:
            form = await action_form(request, guard)
        except Refused as exc:
            return PlainTextResponse(f"403 Forbidden: {exc}; nothing was done\n", 403)
        action = request.path_params["action"]
        back = _local((form.get("next") or ["/"])[0])
        try:
            done = await read(_ACTIONS[action], observer, form) if action in _ACTIONS else None
        except ConduitError as exc:
            done = f"refused: {exc}"
        if done is None:
            return PlainTextResponse(f"404 Not Found: no action {action!r}\n", 404)
        join = "&" if urlsplit(back).query else "?"
        return RedirectResponse(f"{back}{join}{urlencode({'done': done})}", 303)

    async def failed(request: Request, exc: Exception) -> Response:
        status = 503 if isinstance(exc, DatabaseError) else 400
        return await render(request, "error.html", status, message=str(exc))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = threading.Event()

        def sample() -> None:  # the charts' readings, at a steady pace whoever is looking
            while not stop.is_set():
                try:
                    observer.queues()
                    problems.clear()
                except ConduitError as exc:
                    problems[:] = [str(exc)]
                stop.wait(sample_every)

        sampler = threading.Thread(target=sample, name="conduit-dashboard-sampler", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join(5)
            observer.close()

    return Starlette(
        routes=[
            Route("/", queues_page),
            Route("/queues/{queue}", queue_page),
            Route("/queues/{queue}/dead", dead_page),
            Route("/tasks/{task_id:int}", task_page),
            Route("/mesh", mesh_page),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            Route("/actions/{action}", act, methods=["POST"]),
            Mount("/static", StaticFiles(packages=[("conduit.dashboard", "static")]), name="static"),
        ],
        middleware=[Middleware(TokenGate, guard=guard)],
        exception_handlers={ConduitError: failed},
        lifespan=lifespan,
    )


def _local(path: str) -> str:
    """Where to go back to after an action: a path of this site only, never another host."""
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not path.startswith("/") or path.startswith("//"):
        return "/"
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("done="))
    return parts.path + (f"?{query}" if query else "")


def _ids(form: dict[str, list[str]]) -> list[int]:
    try:
        return [int(i) for field in form.get("ids", []) for i in field.replace(",", " ").split()]
    except ValueError:
        raise ConduitError("task ids must be whole numbers") from None


def _queue(form: dict[str, list[str]]) -> str:
    return (form.get("queue") or [""])[0]


def _outcomes(verb: str, ids: list[int], outcomes: list[Any]) -> str:
    ok = sum(1 for o in outcomes if o.value == "ok")
    refused = len(ids) - ok
    return f"{verb} {ok} task{'s' * (ok != 1)}" + (f", {refused} refused" if refused else "")


_ACTIONS: dict[str, Callable[[Observer, dict[str, list[str]]], str]] = {
    "retry": lambda o, f: _outcomes("retried", _ids(f), o.run("retry", _ids(f))),
    "cancel": lambda o, f: _outcomes("cancelled", _ids(f), o.run("cancel", _ids(f))),
    "discard": lambda o, f: f"discarded {len(o.run('discard', _ids(f)))} of {len(_ids(f))} dead tasks",
    "pause": lambda o, f: (
        f"paused {_queue(f)}" if o.run("pause", _queue(f)) else f"{_queue(f)} was paused already"
    ),
    "resume": lambda o, f: (
        f"resumed {_queue(f)}" if o.run("resume", _queue(f)) else f"{_queue(f)} was not paused"
    ),
    "purge": lambda o, f: f"purged {o.run('purge', _queue(f)):,} tasks of {_queue(f)}",
}
