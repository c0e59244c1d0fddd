"""A broker with settings `conduit broker` has no flags for, for tests that need them:
`python tuned_broker.py DSN SCHEMA BROKER_ID [NAME=SECONDS ...]` (broker Config fields). Prints its
endpoint as `conduit broker` does, then serves until SIGTERM."""

from __future__ import annotations

import sys

from conduit import logs
from conduit.broker.core import Config
from conduit.broker.service import Broker


def main() -> None:
    dsn, schema, broker_id, *settings = sys.argv[1:]
    tuned = {name: float(value) for name, value in (s.split("=", 1) for s in settings)}
    logs.setup("info")
    config = Config(broker_id=broker_id, lease_term=3.0, **tuned)  # type: ignore[arg-type]
    service = Broker(config, dsn, schema, "tcp://127.0.0.1:*")
    print(service.endpoint, flush=True)
    service.run()


if __name__ == "__main__":
    main()
