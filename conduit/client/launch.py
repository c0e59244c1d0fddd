"""What `conduit worker module:attr` does around Worker.run: find the Worker, run it, stop.

The current directory goes first on the import path, as `python -m` would put it (and Celery
and RQ do), so `conduit worker myapp.tasks:worker` works from the project's folder.
"""

from __future__ import annotations

import importlib
import os
import sys

from conduit.client.worker import Worker
from conduit.errors import ConduitError


def load(target: str) -> Worker:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr or "worker")
    except (ImportError, AttributeError) as exc:
        raise ConduitError(f"cannot load {target}: {exc} (looked in {os.getcwd()} and sys.path)") from None
    if not isinstance(obj, Worker):
        raise ConduitError(f"{target} is a {type(obj).__name__}, not a conduit.client.Worker")
    if not obj.queues:
        raise ConduitError(
            f"{target} has no handlers: register a task (worker.register) or a handler "
            "(@worker.handler(queue)) before running it"
        )
    return obj
