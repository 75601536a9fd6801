"""Settings: a frozen tree of dataclasses loaded from config.toml, .env and the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config.toml")

# Environment names that the tool users already know, mapped to their setting.
ALIASES = {
    "EXTERNAL_API_BASE_URL": ("directory", "base_url"),
    "LOG_LEVEL": ("app", "log_level"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class AppSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    shutdown_timeout: float = 10.0
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatabaseSettings:
    path: str = "data/batches.db"
    busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class DirectorySettings:
    base_url: str = "https://hospital-directory.onrender.com"
    batch_size: int = 20
    concurrency: int = 20
    creates_per_minute: int = 30
    batch_calls_per_minute: int = 50
    rate_window_seconds: float = 60.0
    rate_window_margin: float = 0.5
    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    settle_seconds: float = 6.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    warmup_timeout: float = 90.0
    idle_seconds: float = 300.0


@dataclass(frozen=True)
class CsvSettings:
    max_rows: int = 1000
    max_bytes: int = 10 * 1024 * 1024
    upload_seconds: float = 60.0
    concurrent_uploads: int = 4


@dataclass(frozen=True)
class ApiSettings:
    bulk_wait_seconds: float = 120.0
    status_cache_seconds: float = 0.5


@dataclass(frozen=True)
class WebsocketSettings:
    heartbeat_seconds: float = 20.0
    max_backlog: int = 1000
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    app: AppSettings = field(default_factory=AppSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    directory: DirectorySettings = field(default_factory=DirectorySettings)
    csv: CsvSettings = field(default_factory=CsvSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    websocket: WebsocketSettings = field(default_factory=WebsocketSettings)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some keys of some sections changed: replace(directory={...})."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in sections.items()
        }
        return dataclasses.replace(self, **changed)


def load_settings(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: Path | None = Path(".env"),
) -> Settings:
    """Build Settings from defaults, the TOML file, .env and the environment, in that order."""
    environ = os.environ if environ is None else environ
    named = config_path or (Path(environ["CONFIG_PATH"]) if "CONFIG_PATH" in environ else None)
    path = named or DEFAULT_CONFIG
    layers: dict[str, dict[str, Any]] = {}
    if path.exists():
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        _merge_toml(layers, data, path)
    elif named is not None:
        raise SettingsError(f"config file {path} does not exist")
    if dotenv_path is not None and dotenv_path.exists():
        _merge_env(layers, read_dotenv(dotenv_path))
    _merge_env(layers, environ)
    return _build(layers)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines: blank lines and # comments skipped, quotes or a trailing comment
    stripped."""
    values = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise SettingsError(f"{path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if value[:1] in ("'", '"') and value.count(value[0]) >= 2:
            value = value[1 : value.index(value[0], 1)]
        else:
            value = value.split(" #", 1)[0].rstrip()  # an unquoted value ends at a comment
        values[key.strip()] = value
    return values


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _merge_toml(layers: dict[str, dict[str, Any]], data: dict[str, Any], path: Path) -> None:
    sections = _sections()
    for section, values in data.items():
        if section not in sections or not isinstance(values, dict):
            raise SettingsError(f"{path}: unknown section [{section}]")
        known = {f.name for f in dataclasses.fields(sections[section])}
        for key, value in values.items():
            if key not in known:
                raise SettingsError(f"{path}: unknown setting {section}.{key}")
            layers.setdefault(section, {})[key] = value


def _merge_env(layers: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    names = dict(ALIASES)
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            names[_variable(section, f.name)] = (section, f.name)
    # Aliases first, so the canonical name wins when both are set.
    for env_name in sorted(names, key=lambda n: n not in ALIASES):
        if env_name in environ:
            section, key = names[env_name]
            layers.setdefault(section, {})[key] = _EnvValue(env_name, environ[env_name])


@dataclass(frozen=True)
class _EnvValue:
    """A raw string from the environment, remembered with its variable name for errors."""

    name: str
    text: str


def _build(layers: dict[str, dict[str, Any]]) -> Settings:
    built = {}
    named = {}  # each setting given a value, as its errors name it
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        values = {}
        for key, raw in layers.get(section, {}).items():
            named[f"{section}.{key}"] = _named(f"{section}.{key}", raw)
            values[key] = _coerce(named[f"{section}.{key}"], hints[key], raw)
        built[section] = cls(**values)
    settings = Settings(**built)
    _validate(settings, named)
    return settings


def _named(name: str, raw: Any) -> str:
    """A setting as an error names it: with the variable that set it, if one did."""
    return f"{name} (from {raw.name})" if isinstance(raw, _EnvValue) else name


def _coerce(where: str, kind: Any, raw: Any) -> Any:
    value = raw.text if isinstance(raw, _EnvValue) else raw
    try:
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError
            number = kind(value)
            if kind is int and isinstance(value, float) and number != value:
                raise ValueError
            if not math.isfinite(number):  # nan or inf: no wait or timeout means that
                raise ValueError
            return number
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(item).strip() for item in items if str(item).strip())
    except (TypeError, ValueError):
        pass
    raise SettingsError(f"setting {where}: {value!r} is not a valid {_kind_name(kind)}")


def _kind_name(kind: Any) -> str:
    return {int: "whole number", float: "number", str: "string"}.get(kind, "comma-separated list")


SQLITE_INT_MAX = 2**63 - 1  # a websocket page size goes to SQLite as a LIMIT
SQLITE_BUSY_MAX = 2**31 - 1  # a larger PRAGMA busy_timeout reads as 0: no waiting at all


def _is_directory_url(text: str) -> bool:
    """An http(s) address with a host and a valid port, and nothing after its path: the
    request paths are appended to it, so a query or fragment would swallow them."""
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port  # a ValueError for a port out of range or not a number
    except ValueError:
        return False
    return (
        url.scheme in ("http", "https")
        and bool(url.hostname)
        and port != 0
        and "?" not in text
        and "#" not in text
    )


def _not_a_name(entry: str) -> bool:
    """Whether an app.allowed_hosts entry holds more than a name (a port, a scheme, a path):
    the browser's Host is matched by its name alone, so such an entry would never match."""
    try:
        ipaddress.ip_address(entry)
    except ValueError:
        return ":" in entry or "/" in entry
    return False


def _not_an_origin(entry: str) -> bool:
    """Whether a websocket.allowed_origins entry is other than `*` or an origin as a browser
    sends it (`https://host` or `http://host:port`: lower case, no path, not even a `/`, and
    no default port): `Origin` is compared with the entries as written, so such an entry
    would never match, and the 403 would go on asking to list what is listed."""
    if entry == "*":
        return False
    try:
        url = urllib.parse.urlsplit(entry)
        port = url.port
    except ValueError:
        return True
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (
        default is None
        or not url.hostname
        or entry != entry.lower()
        or entry != f"{url.scheme}://{url.netloc}"  # a path, query, fragment or trailing /
        or "@" in url.netloc
        or port in (0, default)
    )


def _validate(s: Settings, named: Mapping[str, str]) -> None:
    d = s.directory
    not_names = [entry for entry in s.app.allowed_hosts if _not_a_name(entry)]
    not_origins = [entry for entry in s.websocket.allowed_origins if _not_an_origin(entry)]
    checks = [
        (
            not not_names,
            "app.allowed_hosts",
            "must list names alone, without a scheme, port or path: "
            + ", ".join(map(repr, not_names)),
        ),
        (1 <= s.app.port <= 65535, "app.port", "must be between 1 and 65535"),
        (s.app.log_level.upper() in LOG_LEVELS, "app.log_level", f"must be one of {LOG_LEVELS}"),
        (s.app.shutdown_timeout >= 0, "app.shutdown_timeout", "must be >= 0"),
        (bool(s.database.path), "database.path", "must not be empty"),
        (
            s.database.path != ":memory:",
            "database.path",
            "must be a file: the log outlives the process, and its readers share it",
        ),
        (
            0 <= s.database.busy_timeout_ms <= SQLITE_BUSY_MAX,
            "database.busy_timeout_ms",
            f"must be between 0 and {SQLITE_BUSY_MAX}",
        ),
        (
            _is_directory_url(d.base_url),
            "directory.base_url",
            "must be an http:// or https:// address with a host, a valid port if any, "
            "and no query or fragment",
        ),
        (1 <= d.batch_size <= 20, "directory.batch_size", "must be between 1 and 20"),
        (
            1 <= d.concurrency <= 20,
            "directory.concurrency",
            "must be between 1 and 20: the directory asks for 20 requests in flight at most",
        ),
        (d.creates_per_minute >= 0, "directory.creates_per_minute", "must be >= 0"),
        (d.batch_calls_per_minute >= 0, "directory.batch_calls_per_minute", "must be >= 0"),
        (
            d.max_attempts >= 2,
            "directory.max_attempts",
            "must be at least 2: a row whose answer was lost is looked up, then sent again",
        ),
        (d.backoff_base >= 0, "directory.backoff_base", "must be >= 0"),
        (d.backoff_max >= d.backoff_base, "directory.backoff_max", "must be >= backoff_base"),
        (d.settle_seconds >= 0, "directory.settle_seconds", "must be >= 0"),
        (d.warmup_timeout > 0, "directory.warmup_timeout", "must be positive"),
        (d.idle_seconds >= 0, "directory.idle_seconds", "must be >= 0"),
        (d.rate_window_margin >= 0, "directory.rate_window_margin", "must be >= 0"),
        (d.read_timeout > 0, "directory.read_timeout", "must be positive"),
        (d.connect_timeout > 0, "directory.connect_timeout", "must be positive"),
        (d.rate_window_seconds > 0, "directory.rate_window_seconds", "must be > 0"),
        (s.csv.max_rows >= 1, "csv.max_rows", "must be at least 1"),
        (s.csv.max_bytes >= 1024, "csv.max_bytes", "must be at least 1024"),
        (s.app.host.strip() != "", "app.host", "must not be empty (0.0.0.0: every interface)"),
        (s.csv.upload_seconds > 0, "csv.upload_seconds", "must be positive"),
        (s.csv.concurrent_uploads >= 1, "csv.concurrent_uploads", "must be at least 1"),
        (s.api.bulk_wait_seconds >= 0, "api.bulk_wait_seconds", "must be >= 0"),
        (s.api.status_cache_seconds >= 0, "api.status_cache_seconds", "must be >= 0"),
        (
            1 <= s.websocket.max_backlog <= SQLITE_INT_MAX,
            "websocket.max_backlog",
            f"must be between 1 and {SQLITE_INT_MAX}",
        ),
        (s.websocket.heartbeat_seconds > 0, "websocket.heartbeat_seconds", "must be positive"),
        (
            not not_origins,
            "websocket.allowed_origins",
            "must list origins as a browser sends them, scheme://host[:port] in lower case, "
            "with no path or default port (or *): " + ", ".join(map(repr, not_origins)),
        ),
    ]
    for ok, name, problem in checks:
        if not ok:
            section, key = name.split(".")
            value = getattr(getattr(s, section), key)
            raise SettingsError(f"setting {named.get(name, name)} {problem}; got {value!r}")


def _variable(section: str, key: str) -> str:
    """The environment variable of `section.key` by its own name: APP_PORT for app.port."""
    return f"{section}_{key}".upper()
