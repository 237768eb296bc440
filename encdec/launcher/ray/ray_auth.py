"""The Ray auth token: found or generated, kept in a 0600 file, handed to Ray through the environment only.

This Ray turns token authentication on by default: the dashboard's ``/api/jobs/`` answers 401 without
``Authorization: Bearer <token>``, and every client (a second ``ray start``, ``ray.init(address=...)``,
``JobSubmissionClient``) needs ``RAY_AUTH_MODE=token`` and the token. The launcher points Ray at a token *file*
(``RAY_AUTH_TOKEN_PATH``) so the secret itself never sits in an environment dump, a command line, a log or a
rendered script. Never print or log the token; print the file's path at most.

Token file, first found wins:

1. ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` already set by the user: respected as is;
2. ``$ENCDEC_RAY_TOKEN_FILE``;
3. ``<config dir>/ray_auth_token`` (``$XDG_CONFIG_HOME/encdec-launch`` or ``~/.config/encdec-launch``);
4. Ray's own default ``~/.ray/auth_token`` (a cluster someone started with plain ``ray start``);
5. otherwise a new random token is written to (3) with mode 0600.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["auth_env", "config_dir", "dashboard_line", "ensure_token_file", "read_token"]


def config_dir() -> Path:
    """The launcher's per-user config directory."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "encdec-launch"


def _write_secret(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def ensure_token_file(create: bool = True) -> Path | None:
    """The token file to use (see the module docstring for the order); creates one (0600) when none exists.

    Returns None only when ``RAY_AUTH_TOKEN`` carries the token itself (nothing to point at) or ``create`` is
    False and no file exists.
    """
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    candidates = [Path(p) for p in [os.environ.get("ENCDEC_RAY_TOKEN_FILE")] if p]
    candidates += [config_dir() / "ray_auth_token", Path.home() / ".ray" / "auth_token"]
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return path
    if not create:
        return None
    path = candidates[0]
    try:
        _write_secret(path, secrets.token_hex(32))
    except FileExistsError:  # another launch created it between the check and here: use theirs
        pass
    return path


def auth_env(env: MutableMapping[str, str] | None = None, *, create: bool = True) -> MutableMapping[str, str]:
    """Put ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` into ``env`` (default: this process's environment).

    Respects ``RAY_AUTH_MODE=disabled`` when the user set it (a cluster started without auth).
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return env
    env["RAY_AUTH_MODE"] = "token"
    path = ensure_token_file(create=create)
    if path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
    if env is os.environ:
        _refresh_ray_config()
    return env


def _refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its C++ config when ``ray`` is imported; re-read it if that already happened."""
    import sys

    if "ray._raylet" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # an older Ray without token auth: nothing to refresh
        pass


def dashboard_line(url: str) -> str:
    """``dashboard: URL`` and how to get in: with token auth the dashboard answers 401 without the token, so the
    line names the token's file (never the token itself)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return f"dashboard: {url}"
    path = ensure_token_file(create=False)
    if path is not None:
        return (f"dashboard: {url} (token auth: sign in with the token in {path}; HTTP clients send "
                "'Authorization: Bearer <token>')")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return f"dashboard: {url} (token auth: sign in with the token in $RAY_AUTH_TOKEN)"
    return f"dashboard: {url}"


def read_token() -> str | None:
    """The token text (for HTTP calls the launcher makes itself). Never print the result."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = ensure_token_file(create=False)
    return path.read_text().strip() if path is not None and path.is_file() else None

