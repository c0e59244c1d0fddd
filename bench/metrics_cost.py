"""What serving /metrics costs a broker: `python bench/throughput.py --metrics`.

The burst of throughput.py, in rounds that alternate a broker without --metrics and one with it
whose /metrics is scraped every second meanwhile (parsed as Prometheus would), in one run on one
database; the figure is the ratio of their median throughputs (the issue asks for within 5%),
with the broker's CPU per task of each beside it, which is steadier than throughput.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_EVERY = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper:
    """GET /metrics every second and parse each answer, as Prometheus would: in a process of its
    own, until the block ends. (On a thread of the producer's process, the pure-Python parser
    held the producers' GIL and cost the burst about 10%: a cost of the bench, not the broker.)"""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self.samples = 0

    def __enter__(self) -> Scraper:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, self.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("", timeout=30)  # closing its stdin stops it
        self.scrapes, self.samples = (int(n) for n in out.split())


def scrape_until_stdin_closes(url: str) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    scrapes = samples = 0
    while True:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        samples += sum(len(f.samples) for f in text_string_to_metric_families(text))
        scrapes += 1
        if stop.wait(SCRAPE_EVERY):
            break
    print(scrapes, samples)


def summary(plain: list[Any], served: list[Any]) -> dict[str, Any]:
    """Median throughput and broker CPU per task of each kind of round, and their ratios."""

    def side(results: list[Any]) -> dict[str, Any]:
        rates = [r.figures.per_second for r in results]
        cpu = [r.cpu_s.get("brokers", 0.0) / max(1, r.cpu_tasks) * 1e6 for r in results]
        return {
            "tasks_per_s": [round(x) for x in rates],
            "median_tasks_per_s": round(statistics.median(rates)),
            "broker_cpu_us_per_task": round(statistics.median(cpu), 2),
        }

    a, b = side(plain), side(served)
    return {
        "without_metrics": a,
        "with_metrics": b,
        "throughput_ratio": round(b["median_tasks_per_s"] / a["median_tasks_per_s"], 3),
        "broker_cpu_ratio": round(b["broker_cpu_us_per_task"] / max(1e-9, a["broker_cpu_us_per_task"]), 3),
    }


def table(doc: dict[str, Any], tasks: int, rounds: int) -> str:
    a, b = doc["without_metrics"], doc["with_metrics"]
    lines = [
        f"burst of {tasks:,} tasks, {rounds} rounds each, alternating; /metrics scraped every "
        f"{SCRAPE_EVERY:g} s ({doc['scrapes']} scrapes, {doc['samples_per_scrape']} samples each)",
        f"{'':<18}{'tasks/s (median)':>18}{'broker µs/task':>16}   rounds (tasks/s)",
    ]
    for name, s in (("without --metrics", a), ("with --metrics", b)):
        rounds_text = ", ".join(f"{x:,}" for x in s["tasks_per_s"])
        lines.append(
            f"{name:<18}{s['median_tasks_per_s']:>18,}{s['broker_cpu_us_per_task']:>16.2f}   {rounds_text}"
        )
    lines.append(
        f"ratio with / without: throughput {doc['throughput_ratio']:.3f}, "
        f"broker CPU per task {doc['broker_cpu_ratio']:.3f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    scrape_until_stdin_closes(sys.argv[1])
