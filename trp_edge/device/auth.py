"""The token that keeps a `trp-edge serve` to its owner. TVM's RPC has no authentication: whoever reaches the port
may upload a shared object and run it. So the client sends a token in TVM's handshake (the key's options, as
`-token=...` beside TVM's own `-timeout=...`), and the server checks it, in constant time, before it forks the
session: a session without it, or with a wrong one, gets one error line back and never runs a single call,
upload included. Through a tracker the same holds: the tracker only says where a board is; the token goes to
the board.

Where the token comes from: the client's --token, else $TRP_EDGE_TOKEN, else the variable the target's [rpc]
`token_env` names (never the secret in the TOML). The server's --token or $TRP_EDGE_TOKEN; bound beyond
loopback with neither, it makes one and prints it once, as Jupyter does. numpy-free, torch-free: it runs on the
board."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import sys

TOKEN_ENV = "TRP_EDGE_TOKEN"
REFUSED = "trp-edge serve refused the session: wrong or missing token (pass --token or set $TRP_EDGE_TOKEN)"


def loopback(host: str) -> bool:
    """Only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked(token: str | None, where: str = "--token") -> str | None:
    """A token as given, refused in one line if it cannot travel in TVM's handshake (empty or with spaces)."""
    from ..errors import ConfigError

    if token is None:
        return None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: a token must be non-empty and have no spaces")
    return token


def server_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """(the token the server requires, whether it was generated here): the given one, else $TRP_EDGE_TOKEN, else a
    new one when `host` is beyond loopback; None on loopback with none given."""
    token = checked(token or os.environ.get(TOKEN_ENV) or None)
    if token or loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def client_token(token_env: str | None = None) -> str | None:
    """The token a client presents: $TRP_EDGE_TOKEN (which --token sets), else the variable the target names."""
    from ..errors import ConfigError

    if os.environ.get(TOKEN_ENV):
        return checked(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    if token_env:
        if not os.environ.get(token_env):
            raise ConfigError(f"the target's [rpc] token_env names ${token_env}, which is not set: export it "
                              "(or pass --token)")
        return checked(os.environ[token_env], f"${token_env}")
    return None


def handshake_key(key: str, token: str | None) -> str:
    """The key a client sends in TVM's handshake, with the token as one of its options."""
    return f"{key} -token={token}" if token else key


def redact(text: str, token: str | None) -> str:
    """`text` with the token blanked: TVM may echo the handshake key in an error."""
    return text.replace(token, "***") if token else text


def same(given: str, token: str) -> bool:
    """Constant time, and constant in the lengths too (both sides hashed first)."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(token.encode()).digest())


def _refuse(sock, addr, given: str) -> None:
    from tvm.rpc import _ffi_api

    print(f"trp-edge serve: refused a session from {addr[0]}: {'wrong' if given else 'missing'} token",
          file=sys.stderr, flush=True)
    sock.settimeout(0.5)
    try:  # read the client's session request first: a close with it unread resets the connection, and the
        sock.recv(65536)  # client would see "connection reset" instead of the reason
        sock.settimeout(None)
        _ffi_api.ReturnException(sock.fileno(), REFUSED)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def install(token: str) -> None:
    """In the server process, before it listens: every session's handshake is checked for `token` before TVM
    forks the session (tvm.rpc.server._serving). TVM 0.27's Python server; its key parsing keeps unknown
    options, which is where the token rides."""
    import tvm.rpc.server as server

    parse, serving = server._parse_server_opt, server._serving

    def parse_opts(opts):
        out = parse(opts)
        out["token"] = next((kv[len("-token="):] for kv in opts if kv.startswith("-token=")), "")
        return out

    def gate(sock, addr, opts, load_library):
        given = opts.pop("token", "")
        if not same(given, token):
            _refuse(sock, addr, given)
            return
        serving(sock, addr, opts, load_library)

    server._parse_server_opt = parse_opts
    server._serving = gate
