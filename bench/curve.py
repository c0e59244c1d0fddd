"""CURVE keys for a benchmark's secure scenario (throughput.py --curve): the mesh's broker keypair
and one keypair for the workers and the producer, allowed, in a temporary folder of their own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from conduit.curve import ClientCurve, new_keys


class BenchKeys:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="conduit-bench-keys-"))
        allow = self.folder / "allow"
        allow.mkdir()
        self.server, server_secret = new_keys("broker", self.folder)
        public, self.secret = new_keys("bench", self.folder)
        shutil.copy(public, allow / public.name)
        self.broker_args = ["--curve-secret", str(server_secret), "--curve-allow", str(allow)]
        self.worker_args = ["--curve-secret", str(self.secret), "--curve-server", str(self.server)]
        self.client = ClientCurve.load(self.secret, self.server)

    def __enter__(self) -> BenchKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
