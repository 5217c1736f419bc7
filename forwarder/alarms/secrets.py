"""Secrets named by the config, read from the environment or a file, never from the TOML.

A config field `<name>_env = "VAR"` names an environment variable, `<name>_file =
"/run/secrets/x"` names a file (trailing newlines stripped, as `echo x > file` or a
Docker/Kubernetes secret mount leaves them). `resolve_secret` returns the secret string;
every error names the config key and the variable or file, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_SECRET_FILE_BYTES", "SecretError", "resolve_secret", "secret_ref"]

MAX_SECRET_FILE_BYTES = 64 * 1024  # a secret is a token, a URL or a password; not a dump


class SecretError(Exception):
    """A secret reference cannot be resolved; the message names the key and the source."""


def resolve_secret(
    key: str,
    *,
    env: str | None = None,
    file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The secret named by exactly one of `env` (a variable) or `file` (a path).

    `key` is the config key path reported in errors (e.g. "notifiers.ops_slack.webhook_url");
    `environ` defaults to os.environ (tests pass their own mapping).
    """
    if (env is None) == (file is None):
        raise SecretError(
            f"{key}: set exactly one of {key}_env (an environment variable name) "
            f"or {key}_file (a file path)"
            + ("; both are set" if env is not None else "; neither is set")
        )
    if env is not None:
        value = (os.environ if environ is None else environ).get(env)
        if value is None:
            raise SecretError(f"{key}_env: environment variable {env} is not set")
        if not value.strip():
            raise SecretError(f"{key}_env: environment variable {env} is empty")
        return value
    assert file is not None
    path = Path(file)
    text = read_secret_file(f"{key}_file", path).rstrip("\r\n")
    if not text.strip():
        raise SecretError(f"{key}_file: {path} is empty")
    return text


def read_secret_file(key: str, path: Path) -> str:
    """The UTF-8 text of a secret file, at most MAX_SECRET_FILE_BYTES; a SecretError
    names `key` and the file, never the content."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        # strerror only: str(exc) is safe too, but keep the message in one shape.
        reason = exc.strerror or type(exc).__name__
        raise SecretError(f"{key}: cannot read {path}: {reason}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SecretError(f"{key}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{key}: {path} is not UTF-8 text") from None


def secret_ref(
    config: Any,
    field: str,
    key: str,
    *,
    required: bool = True,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Resolve `<field>_env` / `<field>_file` of a config object; None if optional and unset.

    `key` is the config path of the object (e.g. "notifiers.ops_slack"); errors name
    `<key>.<field>_env` or `<key>.<field>_file`.
    """
    env = getattr(config, f"{field}_env", None)
    file = getattr(config, f"{field}_file", None)
    if env is None and file is None and not required:
        return None
    return resolve_secret(f"{key}.{field}", env=env, file=file, environ=environ)
