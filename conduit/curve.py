"""CURVE security (ZeroMQ's own): key files, and the socket options that turn it on.

A mesh has one broker keypair: every broker's ROUTER and gossip PUB is a CURVE server with it,
so a client needs one server key whatever broker gossip leads it to. Each client and worker has
a keypair of its own, whose public half goes into the brokers' allow-list folder
(conduit.broker.gate). A client's sockets get their options from its Context, so every socket it
makes (a DEALER per broker, the gossip SUB) is a CURVE client without each knowing of it.

Key files are ZeroMQ's certificate format (pyzmq's `zmq.auth`, czmq's `zcert`): NAME.key holds
the public key, NAME.key_secret (mode 0600) both, each as a 40-character Z85 string.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from conduit.errors import ConfigError

KeyFile = str | Path | None
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
HANDSHAKE_MS = 3000  # a handshake not done by then is dropped (ZeroMQ's default: 30 s)
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
_FIELD = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"\n]*)"\s*$', re.MULTILINE)
_PUBLIC_TEXT = """#   ZeroMQ CURVE Public Certificate (conduit keys new)
#   Give it to the brokers' allow-list folder, or to clients as the server key.

metadata
curve
    public-key = "{public}"
"""
_SECRET_TEXT = """#   ZeroMQ CURVE **Secret** Certificate (conduit keys new)
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

metadata
curve
    public-key = "{public}"
    secret-key = "{secret}"
"""


@dataclass(frozen=True)
class Keypair:
    public: bytes  # Z85, 40 bytes
    secret: bytes


def new_keys(name: str, directory: Path) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600) in `directory`; never overwrite either."""
    if not KEY_NAME.match(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a folder")
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists: keys are never overwritten (remove it, or pick another name)")
    public, secret = zmq.curve_keypair()
    _create(secret_path, _SECRET_TEXT.format(public=public.decode(), secret=secret.decode()), 0o600)
    _create(public_path, _PUBLIC_TEXT.format(public=public.decode()), 0o644)
    return public_path, secret_path


def _create(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} exists: keys are never overwritten") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask


def _fields(path: Path) -> dict[bytes, bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    found = {kind: value for kind, value in _FIELD.findall(data)}
    for kind, value in found.items():
        if len(value) != 40 or not set(value) <= _Z85:
            raise ConfigError(f"key file {path}: its {kind.decode()} key is not 40 characters of Z85")
    if b"public" not in found:
        raise ConfigError(f'key file {path} has no public-key = "..." line (make keys with conduit keys new)')
    return found


def read_public(path: str | Path) -> bytes:
    """The public key of a NAME.key file; a secret file is refused, so it is not handed around."""
    fields = _fields(Path(path))
    if b"secret" in fields:
        raise ConfigError(f"{path} holds a secret key: give its public one, {Path(path).stem}{PUBLIC_SUFFIX}")
    return fields[b"public"]


def read_keypair(path: str | Path) -> Keypair:
    """A NAME.key_secret file, which nobody but its owner may read."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read secret key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"secret key file {path} is open to others (mode {mode:04o}): run chmod 600 {path}")
    fields = _fields(path)
    if b"secret" not in fields:
        raise ConfigError(f'{path} has no secret-key = "..." line: give the NAME{SECRET_SUFFIX} file')
    if zmq.curve_public(fields[b"secret"]) != fields[b"public"]:
        raise ConfigError(f"key file {path}: its public key is not the secret key's")
    return Keypair(fields[b"public"], fields[b"secret"])


@dataclass(frozen=True)
class ClientCurve:
    """A client's or worker's own keypair and the mesh's server (broker) public key."""

    keys: Keypair
    server: bytes

    @classmethod
    def load(
        cls, secret: KeyFile = None, server: KeyFile = None, env: Mapping[str, str] | None = None
    ) -> ClientCurve | None:
        """From the files given, else CONDUIT_CURVE_SECRET and CONDUIT_CURVE_SERVER; None (no
        security) when neither is set."""
        given = _pair(env, secret=secret, server=server)
        if given is None:
            return None
        secret, server = given
        return cls(read_keypair(secret), read_public(server))

    def context(self) -> zmq.Context[Any]:
        """A Context whose every socket is a CURVE client of the brokers."""
        ctx: zmq.Context[Any] = zmq.Context()
        ctx.setsockopt(zmq.CURVE_SERVERKEY, self.server)
        ctx.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        ctx.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        return ctx


def _pair(env: Mapping[str, str] | None, **given: KeyFile) -> tuple[str, str] | None:
    """Two settings, each its flag or else its CONDUIT_CURVE_* variable: None when neither is
    set, an error naming both when one is."""
    env = os.environ if env is None else env
    values = [str(v) if v else env.get(f"CONDUIT_CURVE_{name.upper()}", "") for name, v in given.items()]
    if not any(values):
        return None
    if not all(values):
        (a, b) = (f"--curve-{name} (or CONDUIT_CURVE_{name.upper()})" for name in given)
        raise ConfigError(f"CURVE needs both {a} and {b} (README, Security)")
    return values[0], values[1]


def client_context(curve: ClientCurve | None) -> zmq.Context[Any]:
    return zmq.Context() if curve is None else curve.context()


def refused_hint(ctx: zmq.Context[Any]) -> str:
    """For "no connection" errors: a secure broker refuses an unknown key without a word."""
    if zmq.CURVE_SERVERKEY not in ctx.sockopts:
        return ""
    return " (CURVE is on: is this peer's key in the brokers' allow-list, and the server key theirs?)"


@dataclass(frozen=True)
class ServerCurve:
    """A broker's keypair (the mesh's) and the folder of client public keys it lets in."""

    keys: Keypair
    allow: Path

    @classmethod
    def load(
        cls, secret: KeyFile = None, allow: KeyFile = None, env: Mapping[str, str] | None = None
    ) -> ServerCurve | None:
        """From the flags given, else CONDUIT_CURVE_SECRET and CONDUIT_CURVE_ALLOW; None (no
        security) when neither is set."""
        given = _pair(env, secret=secret, allow=allow)
        if given is None:
            return None
        secret, allow = given
        if not Path(allow).is_dir():
            raise ConfigError(f"--curve-allow {allow}: no such folder")
        return cls(read_keypair(secret), Path(allow))

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CURVE server whose peers the ZAP handler checks; before it binds. With
        ZAP enforced, a handler that is gone refuses everyone rather than letting everyone in. A
        refused handshake may hang until the handshake interval ends (conduit.broker.gate), so
        that interval is short: the peer then reconnects and is asked about again."""
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"conduit")
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
