"""Where the Lode API is and how to authenticate, for calls made outside containers."""

from __future__ import annotations

import json
import os

DEFAULT_CONFIG = os.path.join("~", ".config", "lode", "client.json")

_HOW_TO = (
    "set LODE_API and LODE_TOKEN, point LODE_CONFIG at a client.json, "
    f"or run `lode serve`, which writes {DEFAULT_CONFIG}"
)


class ConfigError(RuntimeError):
    """No usable API location or token was found."""


def host_mode() -> bool:
    """True while `python3 -m lode collect/run` imports the user's file on the host."""
    return os.environ.get("LODE_COLLECT", "") not in ("", "0")


def find_api() -> tuple[str, str | None]:
    """Returns (api_url, token): the environment first, then the config file. LODE_API alone
    (as `lode run` sets it for a server without a token) uses the config file's token only
    when that file names the same API, so a token never goes to another server."""
    api = os.environ.get("LODE_API")
    token = os.environ.get("LODE_TOKEN")
    if token and not api:
        raise ConfigError("LODE_TOKEN is set but LODE_API is not: set both, or neither to use the config file")
    if api:
        api = api.rstrip("/")
        if token:
            return api, token
        try:
            file_api, file_token = _read_config()
        except ConfigError:
            return api, None
        return api, file_token if file_api == api else None
    return _read_config()


def _read_config() -> tuple[str, str]:
    explicit = os.environ.get("LODE_CONFIG")
    path = os.path.expanduser(explicit or DEFAULT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"LODE_CONFIG names {path}, which does not exist; {_HOW_TO}") from None
        raise ConfigError(f"cannot find the Lode API: {_HOW_TO}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); fix or remove it, or {_HOW_TO}") from None

    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object with api_url and token; {_HOW_TO}")
    api, token = data.get("api_url"), data.get("token")
    if not (isinstance(api, str) and api and isinstance(token, str) and token):
        raise ConfigError(f"{path} lacks a string api_url or token; {_HOW_TO}")
    return api.rstrip("/"), token
