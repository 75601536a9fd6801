"""Settings: defaults < config.toml < .env < environment, and clear errors for bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config.toml"


def load(tmp_path: Path, toml: str = "", dotenv: str | None = None, **environ: str) -> Settings:
    """Settings from a config.toml holding `toml`, an optional .env, and `environ` only."""
    config = tmp_path / "config.toml"
    config.write_text(toml, encoding="utf-8")
    env_file = tmp_path / ".env"
    if dotenv is not None:
        env_file.write_text(dotenv, encoding="utf-8")
    return load_settings(config_path=config, environ=environ, dotenv_path=env_file)


def test_empty_sources_give_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path) == Settings()


def test_shipped_config_toml_states_the_defaults() -> None:
    assert load_settings(config_path=SHIPPED_CONFIG, environ={}, dotenv_path=None) == Settings()


def test_each_source_overrides_the_ones_below(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        toml='[app]\nport = 8001\nhost = "toml"\nshutdown_timeout = 3\n'
        "[directory]\nconcurrency = 5\n",
        dotenv="APP_PORT=8002\nAPP_HOST=dotenv\n",
        APP_PORT="8003",
    )

    assert settings.app.port == 8003  # environment over .env
    assert settings.app.host == "dotenv"  # .env over config.toml
    assert settings.app.shutdown_timeout == 3.0  # config.toml over the default
    assert settings.directory.concurrency == 5
    assert settings.directory.batch_size == 20  # the default


@pytest.mark.parametrize(
    ("name", "value", "section", "key", "expected"),
    [
        ("DIRECTORY_CONCURRENCY", "10", "directory", "concurrency", 10),
        ("DIRECTORY_RATE_WINDOW_MARGIN", "0.25", "directory", "rate_window_margin", 0.25),
        ("DATABASE_PATH", "/var/lib/hbp.db", "database", "path", "/var/lib/hbp.db"),
        (
            "WEBSOCKET_ALLOWED_ORIGINS",
            "https://a.example, https://b.example",
            "websocket",
            "allowed_origins",
            ("https://a.example", "https://b.example"),
        ),
    ],
)
def test_environment_names_are_section_and_key_in_upper_case(
    tmp_path: Path, name: str, value: str, section: str, key: str, expected: object
) -> None:
    settings = load(tmp_path, **{name: value})

    assert getattr(getattr(settings, section), key) == expected


def test_lower_case_environment_names_are_not_settings(tmp_path: Path) -> None:
    assert load(tmp_path, app_port="1234").app.port == 8000


@pytest.mark.parametrize(
    ("alias", "section", "key", "value"),
    [
        ("EXTERNAL_API_BASE_URL", "directory", "base_url", "http://localhost:9000"),
        ("LOG_LEVEL", "app", "log_level", "DEBUG"),
    ],
)
def test_aliases_set_their_setting(
    tmp_path: Path, alias: str, section: str, key: str, value: str
) -> None:
    assert getattr(getattr(load(tmp_path, **{alias: value}), section), key) == value


def test_canonical_name_wins_over_its_alias_in_one_source(tmp_path: Path) -> None:
    settings = load(tmp_path, LOG_LEVEL="DEBUG", APP_LOG_LEVEL="ERROR")

    assert settings.app.log_level == "ERROR"


def test_alias_in_the_environment_wins_over_dotenv(tmp_path: Path) -> None:
    settings = load(tmp_path, dotenv="APP_LOG_LEVEL=ERROR\n", LOG_LEVEL="DEBUG")

    assert settings.app.log_level == "DEBUG"


def test_dotenv_skips_comments_and_strips_export_and_quotes(tmp_path: Path) -> None:
    dotenv = "# local overrides\n\nexport APP_HOST=\"127.0.0.1\"\nDATABASE_PATH='x.db'\n"

    settings = load(tmp_path, dotenv=dotenv)

    assert (settings.app.host, settings.database.path) == ("127.0.0.1", "x.db")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"APP_PORT": "abc"}, "app.port (from APP_PORT)"),
        ({"APP_PORT": "true"}, "app.port (from APP_PORT)"),
        ({"APP_PORT": "80.5"}, "app.port (from APP_PORT)"),
        ({"APP_PORT": "70000"}, "app.port"),
        ({"APP_PORT": "0"}, "app.port"),
        (
            {"DIRECTORY_BACKOFF_BASE": "fast"},
            "directory.backoff_base (from DIRECTORY_BACKOFF_BASE)",
        ),
        ({"APP_HOST": " "}, "app.host"),  # aiohttp took it for every interface
        ({"DIRECTORY_BATCH_SIZE": "21"}, "directory.batch_size"),
        ({"DIRECTORY_CONCURRENCY": "21"}, "directory.concurrency"),
        ({"LOG_LEVEL": "LOUD"}, "app.log_level (from LOG_LEVEL)"),
        ({"APP_LOG_LEVEL": "verbose"}, "app.log_level (from APP_LOG_LEVEL)"),
        ({"EXTERNAL_API_BASE_URL": "ftp://x"}, "directory.base_url"),
        ({"EXTERNAL_API_BASE_URL": "http://"}, "directory.base_url"),
        ({"DATABASE_PATH": ""}, "database.path"),
        ({"DATABASE_PATH": ":memory:"}, "database.path"),
        ({"DIRECTORY_BACKOFF_BASE": "nan"}, "directory.backoff_base (from"),
        ({"API_BULK_WAIT_SECONDS": "inf"}, "api.bulk_wait_seconds (from"),
        ({"DIRECTORY_SETTLE_SECONDS": "-5"}, "directory.settle_seconds"),
        ({"APP_SHUTDOWN_TIMEOUT": "-1"}, "app.shutdown_timeout"),
        ({"WEBSOCKET_HEARTBEAT_SECONDS": "-1"}, "websocket.heartbeat_seconds"),
        ({"DIRECTORY_MAX_ATTEMPTS": "1"}, "directory.max_attempts"),
        ({"DIRECTORY_BACKOFF_MAX": "0.01"}, "directory.backoff_max"),
        ({"CSV_UPLOAD_SECONDS": "0"}, "csv.upload_seconds"),
        ({"CSV_CONCURRENT_UPLOADS": "0"}, "csv.concurrent_uploads"),
        ({"DIRECTORY_BATCH_CALLS_PER_MINUTE": "-1"}, "directory.batch_calls_per_minute"),
        # The browser's Host is matched by name: a listed port or scheme never matches.
        ({"APP_ALLOWED_HOSTS": "h.example, h.example:8000"}, "app.allowed_hosts"),
        ({"APP_ALLOWED_HOSTS": "https://h.example"}, "app.allowed_hosts"),
        # Origin is compared as the browser writes it: these never matched, and the 403
        # asked to list the origin that was listed.
        ({"WEBSOCKET_ALLOWED_ORIGINS": "https://d.example/"}, "websocket.allowed_origins"),
        ({"WEBSOCKET_ALLOWED_ORIGINS": "d.example"}, "websocket.allowed_origins"),
        ({"WEBSOCKET_ALLOWED_ORIGINS": "https://D.example"}, "websocket.allowed_origins"),
        ({"WEBSOCKET_ALLOWED_ORIGINS": "https://d.example:443"}, "websocket.allowed_origins"),
    ],
)
def test_bad_environment_values_name_the_setting(
    tmp_path: Path, environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"setting {named}")) as refused:
        load(tmp_path, **environ)
    (variable,) = environ
    assert variable in str(refused.value)  # where the operator set it, too


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[app]\nport = "abc"\n', "app.port"),
        ("[app]\nport = 1.5\n", "app.port"),
        ("[app]\nport = true\n", "app.port"),
        ("[app]\nhost = 5\n", "app.host"),
        ('[app]\nlog_level = "verbose"\n', r"setting app.log_level must be one of"),
        ("[websocket]\nallowed_origins = 5\n", "websocket.allowed_origins"),
        ("[app]\nprot = 8000\n", "unknown setting app.prot"),
        ("[apps]\nport = 8000\n", r"unknown section \[apps\]"),
        ("app = 5\n", r"unknown section \[app\]"),
    ],
)
def test_bad_config_values_name_the_setting(tmp_path: Path, toml: str, named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load(tmp_path, toml=toml)


def test_allowed_hosts_are_names_or_addresses(tmp_path: Path) -> None:
    settings = load(tmp_path, APP_ALLOWED_HOSTS="H.example, ::1, *,")
    assert settings.app.allowed_hosts == ("H.example", "::1", "*")


def test_allowed_origins_are_origins_as_a_browser_sends_them(tmp_path: Path) -> None:
    listed = "https://d.example, http://127.0.0.1:8080, http://[::1]:8000, *"
    settings = load(tmp_path, WEBSOCKET_ALLOWED_ORIGINS=listed)
    assert settings.websocket.allowed_origins == (
        "https://d.example",
        "http://127.0.0.1:8080",
        "http://[::1]:8000",
        "*",
    )


def test_malformed_dotenv_line_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"\.env:2: expected KEY=VALUE"):
        load(tmp_path, dotenv="APP_PORT=8001\nnot a setting\n")


def test_missing_config_file_given_explicitly_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "other.toml"

    with pytest.raises(SettingsError, match=r"other\.toml does not exist"):
        load_settings(config_path=missing, environ={}, dotenv_path=None)


def test_missing_config_file_named_by_config_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(environ={"CONFIG_PATH": str(tmp_path / "nope.toml")}, dotenv_path=None)


def test_malformed_config_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config\.toml"):
        load(tmp_path, toml="[app\nport = 8000\n")


@pytest.mark.parametrize("which", ["config.toml", ".env"])
@pytest.mark.parametrize("unreadable", ["latin-1", "a folder"])
def test_a_settings_file_that_cannot_be_read_is_a_settings_error(
    tmp_path: Path, which: str, unreadable: str
) -> None:
    config, dotenv = tmp_path / "config.toml", tmp_path / ".env"
    config.write_text("[app]\nport = 8001\n", encoding="utf-8")
    dotenv.write_text("APP_PORT=8002\n", encoding="utf-8")
    bad = tmp_path / which
    bad.unlink()
    if unreadable == "a folder":
        bad.mkdir()
    else:
        bad.write_bytes(b"# caf\xe9\n")

    with pytest.raises(SettingsError, match=re.escape(str(bad))):
        load_settings(config_path=config, environ={}, dotenv_path=dotenv)


def test_replace_changes_only_the_named_keys() -> None:
    settings = Settings().replace(directory={"concurrency": 3})

    assert settings.directory.concurrency == 3
    assert settings.directory.batch_size == Settings().directory.batch_size
    assert settings.app == Settings().app


def test_dotenv_values_lose_trailing_comments_but_keep_quoted_text(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("DATABASE_PATH=x.db # local copy\nAPP_HOST='a # b'\n")
    settings = load_settings(None, {}, dotenv)
    assert settings.database.path == "x.db"
    assert settings.app.host == "a # b"


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # urlsplit raises: was a traceback and exit 1
        "http://127.0.0.1:99999",  # was accepted: every batch then failed "InvalidUrlClientError"
        "http://127.0.0.1:abc",
        "http://127.0.0.1:0",
        "http://127.0.0.1:9000?x=1",  # was accepted: every create went to / and got a 405
        "http://127.0.0.1:9000#x",
    ],
)
def test_directory_base_url_the_client_cannot_use_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match=re.escape("setting directory.base_url")):
        load(tmp_path, EXTERNAL_API_BASE_URL=url)


@pytest.mark.parametrize(
    "url", ["http://[::1]:9000", "https://h.example/prefix/", "http://u:p@h.example:9000"]
)
def test_directory_base_urls_with_brackets_paths_or_users_are_accepted(
    tmp_path: Path, url: str
) -> None:
    assert load(tmp_path, EXTERNAL_API_BASE_URL=url).directory.base_url == url


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        # SQLite reads a busy_timeout past 2**31 - 1 as 0, and a LIMIT past 2**63 - 1 overflows.
        ({"DATABASE_BUSY_TIMEOUT_MS": str(2**31)}, "database.busy_timeout_ms"),
        ({"WEBSOCKET_MAX_BACKLOG": str(2**63)}, "websocket.max_backlog"),
    ],
)
def test_values_past_what_sqlite_takes_are_refused(
    tmp_path: Path, environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"setting {named}")):
        load(tmp_path, **environ)
