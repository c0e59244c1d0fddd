"""The code on docs/getting-started.md and in the README's task section, run as written.

Each fenced python block starts with `# NAME.py`: all are written into an empty folder; the one
named tasks.py is served by `conduit worker tasks:worker` started in that folder (as the page
says), and the others run there as `python NAME.py`, in order, against a real broker (its
endpoint in CONDUIT_BROKER, which the pages read). A ```text block right after a script is
what that script prints, exactly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Process

ROOT = Path(__file__).parent.parent
CONDUIT = str(Path(sys.executable).parent / "conduit")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.S | re.M)


def scripts(page: Path) -> list[tuple[str, str, str | None]]:
    """(file name, code, expected output or None) of each python block, in order."""
    text = page.read_text()
    blocks = list(BLOCK.finditer(text))
    found = []
    for block, after in zip(blocks, [*blocks[1:], None], strict=True):
        if block.group(1) != "python":
            continue
        name = block.group(2).splitlines()[0].removeprefix("# ").strip()
        assert re.fullmatch(r"\w+\.py", name), f"{page.name}: a python block must start with '# NAME.py'"
        adjacent = (
            after is not None and after.group(1) == "text" and not text[block.end() : after.start()].strip()
        )
        found.append((name, block.group(2), after.group(2) if adjacent and after else None))
    return found


@pytest.mark.parametrize("page", ["docs/getting-started.md", "README.md"])
def test_the_pages_code_runs_as_written(start_broker, processes, tmp_path: Path, page: str) -> None:
    blocks = scripts(ROOT / page)
    assert any(name == "tasks.py" for name, _, _ in blocks) and len(blocks) >= 2
    for name, code, _ in blocks:
        (tmp_path / name).write_text(code)
    broker = start_broker()
    env = {**os.environ, "CONDUIT_BROKER": broker.endpoint, "PYTHONPATH": ""}
    worker = Process(["worker", "tasks:worker"], env, program=[CONDUIT], cwd=tmp_path)
    processes.append(worker)
    for name, _, expected in blocks:
        if name == "tasks.py":
            continue
        run = subprocess.run(
            [sys.executable, name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{page} {name} failed:\n{run.stderr}\nworker:\n{worker.log()}"
        if expected is not None:
            assert run.stdout == expected, f"{page} {name} printed something else"
    assert worker.stop() == 0, worker.log()
