"""API keys: where they come from, and which one a request carries.

Keys never come from the command line (any local user reads it in `ps`): they come from a key file
(`--api-key-file`, or `$CONCLAVE_API_KEY_FILE`) and from `$CONCLAVE_API_KEYS`, both together if both are
set. Each key has a name, and the name is what the audit log shows (with a fingerprint, never the key):

    # key file: one `NAME KEY` a line; blank lines and `#` comments are ignored
    alice   7Hq0p3V2mXb9sK1dZr4tYw
    billing-batch  c2lJ8nQ5eRfT6uVyW0aX

    CONCLAVE_API_KEYS="alice:7Hq0p3V2mXb9sK1dZr4tYw,billing-batch:c2lJ8nQ5eRfT6uVyW0aX"

A name is 1 to 64 of `A-Z a-z 0-9 _ . -`. A key is at least 16 characters of RFC 6750's bearer token
alphabet (`A-Z a-z 0-9 - . _ ~ + /`, then `=` padding): what a client can send as `Bearer KEY` as it is, and
free of the `:`, `,`, `#` and whitespace the two formats use as separators. Names and keys are unique
across both sources. Anything else is an `APIKeyError` naming the source and line, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import stat
from pathlib import Path

log = logging.getLogger("conclave.ingress")

ENV_KEYS = "CONCLAVE_API_KEYS"
ENV_KEY_FILE = "CONCLAVE_API_KEY_FILE"
MIN_KEY_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY = re.compile(r"[A-Za-z0-9._~+/-]+=*")
ANONYMOUS = "anonymous"  # the caller of every request when no key is configured


class APIKeyError(ValueError):
    """A key file or `$CONCLAVE_API_KEYS` that cannot be used; the message is for the operator."""


def load_api_keys(file: Path | None, env_value: str | None) -> dict[str, str]:
    """name -> key from the key file and the environment variable's value (None or blank: not set).
    An empty result means no key is required."""
    entries: list[tuple[str, str, str]] = []  # (where, name, key)
    if file is not None:
        entries += read_key_file(Path(file))
    if env_value is not None and env_value.strip():
        entries += parse_env_keys(env_value)
    keys: dict[str, str] = {}
    names_by_key: dict[str, str] = {}
    for where, name, key in entries:
        check(where, name, key)
        if name in keys:
            raise APIKeyError(f"{where}: the name `{name}` is given twice")
        if key in names_by_key:
            raise APIKeyError(f"{where}: the key of `{name}` is also the key of `{names_by_key[key]}`")
        keys[name] = key
        names_by_key[key] = name
    return keys


def read_key_file(path: Path) -> list[tuple[str, str, str]]:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise APIKeyError(f"cannot read the API key file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # A warning, not an error: the operator may share it on purpose (a group of admins), but usually it
        # is a file made with the default umask.
        log.warning("the API key file %s can be read by other users (mode %o); `chmod 600 %s`", path,
                    stat.S_IMODE(mode), path)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()  # `#` is in neither alphabet: a comment may also end a line
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 2:
            raise APIKeyError(f"{where}: expected `NAME KEY`, got {len(fields)} fields")
        entries.append((where, fields[0], fields[1]))
    if not entries:  # given a key file, the operator wants keys: an empty one must not open the server
        raise APIKeyError(f"the API key file {path} has no keys")
    return entries


def parse_env_keys(value: str) -> list[tuple[str, str, str]]:
    entries = []
    for number, item in enumerate(value.split(","), 1):
        item = item.strip()
        if not item:
            continue
        where = f"${ENV_KEYS} entry {number}"
        name, colon, key = item.partition(":")
        if not colon:
            raise APIKeyError(f"{where}: expected `NAME:KEY`")
        entries.append((where, name.strip(), key.strip()))
    return entries


def check(where: str, name: str, key: str) -> None:
    if not _NAME.fullmatch(name):
        raise APIKeyError(f"{where}: a name is 1 to 64 of A-Z a-z 0-9 _ . - (got {name[:70]!r})")
    if len(key) < MIN_KEY_LENGTH:
        raise APIKeyError(f"{where}: the key of `{name}` has {len(key)} characters; at least {MIN_KEY_LENGTH}")
    if not _KEY.fullmatch(key):
        raise APIKeyError(f"{where}: the key of `{name}` has a character outside A-Z a-z 0-9 - . _ ~ + / "
                          f"(and `=` at the end)")


def fingerprint(key: str) -> str:
    """Tells keys apart in the audit log (a key replaced under the same name), and is not the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def caller_of(name: str, key: str) -> str:
    """The job's `caller` for a request made with this key: `key:<name>:<fingerprint>`."""
    return f"key:{name}:{fingerprint(key)}"


class KeyRing:
    """The configured keys, as a request's `Authorization` header is checked against them."""

    def __init__(self, keys: dict[str, str]):
        # SHA-256 of each key: compared at a fixed length, so neither the time nor the result depends on how
        # long a key is or how much of it a guess got right.
        self.entries = [(hashlib.sha256(key.encode()).digest(), caller_of(name, key)) for name, key in keys.items()]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def caller(self, token: str) -> str | None:
        """The caller whose key `token` is, or None. Every key is compared, whichever matches."""
        given = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, caller in self.entries:
            if hmac.compare_digest(given, digest):
                found = caller
        return found


def bearer_token(authorization: str) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235), or
    None for any other header, a bare key included."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
