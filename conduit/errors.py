"""One error tree, so callers catch ConduitError and users read a message they can act on."""


class ConduitError(Exception):
    """Base of every error Conduit raises on purpose; its message is meant for the user."""


class ConfigError(ConduitError):
    """A setting from the environment or a flag is malformed."""


class DatabaseError(ConduitError):
    """PostgreSQL cannot be reached, or the DSN does not name a server."""


class SchemaError(ConduitError):
    """The database schema is missing or from another version of Conduit."""


class InvalidTask(ConduitError):
    """A task breaks a rule (queue name, payload size, retry policy); nothing was written."""


class BrokerLeaseLost(ConduitError):
    """The broker's lease expired or a newer epoch took it; its buffer is no longer its own."""
