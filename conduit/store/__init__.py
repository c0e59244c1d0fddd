"""All of Conduit's PostgreSQL: the schema, the named queries, the Store that runs them."""

from conduit.store.embedded import EmbeddedPostgres, dsn_for
from conduit.store.store import BrokerLease, Peer, Reaped, Store, connect, describe_dsn, init_schema

__all__ = [
    "BrokerLease",
    "EmbeddedPostgres",
    "Peer",
    "Reaped",
    "Store",
    "connect",
    "describe_dsn",
    "dsn_for",
    "init_schema",
]
