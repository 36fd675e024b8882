"""What the app trusts from a client: session ids and structure payloads it signed itself, and Host names it serves.

Every browser tab gets a session id from the server, signed with HMAC-SHA256 under a secret made when this module
is first imported (one per server process; the job server and its jobs are forked and inherit it), or read from a
0600 file in the app's --work-dir (`use_secret_file`), so that a restart with the same folder keeps its sessions. A
client that invents an id, or posts one it learned, is refused (see README, "Security model"). Structure payloads
shown in the 3D view are signed the same way, so the server draws only structures it made, never one a client
posts. The Host check keeps a DNS-rebinding page (a foreign name that resolves to 127.0.0.1) from driving the app.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import socket
from collections.abc import Iterable

_SECRET = secrets.token_bytes(32)  # what new ids and payloads are signed with
_ACCEPTED = [_SECRET]  # what a signature may have been made with: this process's own and every work folder's
SESSION_ID_LENGTH = 32 + 1 + 32  # hex nonce, ".", hex signature (truncated to 128 bits)
SIGNATURE_FIELD = "signature"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class UntrustedInputError(ValueError):
    """A client sent a session id or payload this server did not sign."""


def use_secret_file(path) -> None:
    """Sign with the secret kept in `path` (made there, readable by this user only, when missing): ids issued
    before a restart stay valid afterwards. Ids signed before this call stay valid too (a process may host more
    than one context). A file anyone else may read, or of the wrong length, is refused."""
    import os
    import stat
    from pathlib import Path

    global _SECRET
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UntrustedInputError(f"{path} is readable by other users: remove it (a new one is made) or "
                                      "chmod 600 it") from None
        secret = path.read_bytes()
        if len(secret) != 32:
            raise UntrustedInputError(f"{path} is not a session secret (expected 32 bytes): remove it") from None
    else:
        secret = secrets.token_bytes(32)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secret)
    _SECRET = secret
    if secret not in _ACCEPTED:
        _ACCEPTED.append(secret)


def _mac(kind: str, message: bytes, secret: bytes | None = None) -> str:
    return hmac.new(secret or _SECRET, kind.encode() + b"\0" + message, hashlib.sha256).hexdigest()


def _matches(signature: str, kind: str, message: bytes, length: int | None = None) -> bool:
    """Whether `signature` is the MAC of `message` under any accepted secret (constant-time per secret)."""
    if not isinstance(signature, str) or not signature.isascii():
        return False
    found = False
    for secret in _ACCEPTED:
        found |= hmac.compare_digest(signature, _mac(kind, message, secret)[:length])
    return found


# -- session ids ------------------------------------------------------------------------------------------------------


def issue_session_id() -> str:
    """A fresh session id signed by this process: `<nonce>.<signature>`."""
    nonce = secrets.token_hex(16)
    return f"{nonce}.{_mac('session', nonce.encode())[:32]}"


def session_id_is_valid(sid) -> bool:
    """True only for an id `issue_session_id` of this process made (constant-time comparison)."""
    if not isinstance(sid, str) or len(sid) != SESSION_ID_LENGTH or sid[32] != ".":
        return False
    nonce, signature = sid[:32], sid[33:]
    return _matches(signature, "session", nonce.encode(), 32)


def check_session_id(sid) -> str:
    """`sid` if this process issued it; UntrustedInputError otherwise (the page should be reloaded)."""
    if not sid:
        raise UntrustedInputError("no session id: reload the page")
    if not session_id_is_valid(sid):
        raise UntrustedInputError("unknown session id (not issued by this app, or from before a restart): "
                                  "reload the page")
    return sid


# -- signed payloads --------------------------------------------------------------------------------------------------


def _canonical(value):
    """JSON-able value in a form that survives a trip through the browser unchanged: JavaScript turns 1.0 into 1,
    so every number is hashed as a float; keys are sorted when dumped."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        number = float(value)
        return number if math.isfinite(number) else repr(number)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot sign a {type(value).__name__}")


def _payload_body(payload: dict) -> bytes:
    body = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    return json.dumps(_canonical(body), sort_keys=True, separators=(",", ":")).encode()


def _payload_mac(payload: dict) -> str:
    return _mac("payload", _payload_body(payload))


def sign_payload(payload: dict) -> dict:
    """`payload` with a `signature` field the server checks when the payload comes back (see payload_is_signed)."""
    return {**payload, SIGNATURE_FIELD: _payload_mac(payload)}


def payload_is_signed(payload) -> bool:
    """True when `payload` is exactly what `sign_payload` of this process returned (after a browser round trip)."""
    if not isinstance(payload, dict) or not isinstance(payload.get(SIGNATURE_FIELD), str):
        return False
    try:
        body = _payload_body(payload)
    except (TypeError, ValueError, RecursionError):
        return False
    return _matches(payload[SIGNATURE_FIELD], "payload", body)


# -- the sessions a Dash request speaks for ---------------------------------------------------------------------------


def _callback_values(body) -> Iterable:
    """The input and state values of a Dash callback request body (pattern-matching inputs come as nested lists)."""
    if not isinstance(body, dict):
        return
    stack = [body.get("inputs"), body.get("state")]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict) and "value" in item:
            yield item["value"]


def claimed_session_ids(body) -> list:
    """Every session id a callback request body carries (in `{"sid": ...}` store values), signed or not."""
    return [value["sid"] for value in _callback_values(body) if isinstance(value, dict) and "sid" in value]


def request_session_ids() -> frozenset[str]:
    """The valid session ids the current Flask request carries; empty outside a request."""
    import flask

    if not flask.has_request_context():
        return frozenset()
    body = flask.request.get_json(silent=True)
    return frozenset(sid for sid in claimed_session_ids(body) if session_id_is_valid(sid))


# -- Host names -------------------------------------------------------------------------------------------------------


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a request's Host header may carry for a server bound to `bind_host`: loopback names, the bound
    address itself, this machine's names when bound to every interface, and any `extra` (a reverse proxy's name)."""
    names = set(LOOPBACK_HOSTS) | {n.strip().lower() for n in extra if n.strip()}
    host = (bind_host or "").strip().lower().strip("[]")
    if host in ("", "0.0.0.0", "::"):
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= {info[4][0].lower() for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    elif host:
        names.add(host)
    return frozenset(names)


def host_name(header: str | None) -> str:
    """The name part of a Host header (`[::1]:8050` → `::1`, `LocalHost:80` → `localhost`)."""
    header = (header or "").strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.rsplit(":", 1)[0]
    return header
