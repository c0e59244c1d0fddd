"""ZeroMQ endpoints checked before use: ZeroMQ takes `127.0.0.1:5555` without a word and then
waits forever, so every command and the Client refuse a malformed one at once, saying why."""

from __future__ import annotations

import re

from conduit.errors import ConfigError

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5}|\*)$")
_OTHER = re.compile(r"^(ipc|inproc)://\S+$")


def check_endpoint(endpoint: str, *, bind: bool = False) -> str:
    """Return `endpoint` if ZeroMQ can use it (tcp://host:port, ipc://path, inproc://name), else
    raise ConfigError naming the fix. A port may be `*` or 0 (any free one) only where one binds."""
    if _OTHER.match(endpoint):
        return endpoint
    match = _TCP.match(endpoint)
    if match is None:
        if "://" not in endpoint:
            raise ConfigError(
                f"endpoint {endpoint!r} has no transport: write tcp://{endpoint or 'HOST:PORT'}"
            )
        raise ConfigError(f"endpoint {endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    port = match["port"]
    if port == "*" and not bind:
        raise ConfigError(f"endpoint {endpoint!r}: port * is only for binding; name the broker's port")
    if port != "*" and not (0 if bind else 1) <= int(port) < 65536:
        raise ConfigError(f"endpoint {endpoint!r}: port {port} is not {0 if bind else 1}..65535")
    if match["host"] == "*" and not bind:
        raise ConfigError(f"endpoint {endpoint!r}: host * is only for binding; name the broker's host")
    return endpoint


WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "[::]", "[0:0:0:0:0:0:0:0]"})


def check_advertise(bind: str, advertise: str | None, option: str = "--advertise") -> None:
    """A broker names its endpoints to its peers (gossip, PONG, the database): a wildcard bind
    says nothing they could connect to, so it needs the address they reach it by. Raise
    ConfigError when one is missing or is itself not connectable."""
    if advertise is not None:
        match = _TCP.match(check_endpoint(advertise))
        if match is not None and match["host"] in WILDCARD_HOSTS:
            raise ConfigError(f"{option} {advertise}: name an address peers can connect to")
        return
    match = _TCP.match(bind)
    if match is not None and match["host"] in WILDCARD_HOSTS:
        raise ConfigError(
            f"{bind} binds every interface, which peers on other hosts cannot connect to: "
            f"give {option} tcp://ADDRESS:PORT, the address they reach this broker by"
        )


def split_endpoints(values: tuple[str, ...] | list[str]) -> list[str]:
    """Endpoints given as repeated options, comma-separated, or both; each one checked."""
    found = [part.strip() for value in values for part in value.split(",")]
    return [check_endpoint(e) for e in found if e]
