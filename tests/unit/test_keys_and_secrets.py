"""API keys, secrets and the refusal to listen openly without credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from _support import Clock
from tokenrelay.config import Settings, check_exposure, load_settings
from tokenrelay.security import ApiKey, KeyStore, Secret, hash_key, main, new_key


def _entry(key_id: str, key: str, **extra: object) -> str:
    lines = [f'[[keys]]\nid = "{key_id}"\nsha256 = "{hash_key(key)}"']
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_keys_file_finds_the_right_key_and_rereads_changes(tmp_path: Path) -> None:
    alice, bob = new_key(), new_key()
    path = tmp_path / "keys.toml"
    path.write_text(_entry("alice", alice, requests_per_minute=60) + _entry("bob", bob))
    store = KeyStore(path)
    found = store.find(alice)
    assert found is not None and (found.id, found.requests_per_minute) == ("alice", 60)
    assert store.find(bob) is not None and store.find(bob + "x") is None
    assert store.find("") is None
    path.write_text(_entry("alice", alice, revoked=True) + _entry("bob", bob) + "# changed\n")
    store.reload()
    revoked = store.find(alice)
    assert revoked is not None and revoked.revoked
    path.write_text("[[keys]]\nid = 'broken'\n")  # no digest: refused, old keys stay
    with pytest.raises(ValueError, match="sha256"):
        store.reload()
    assert store.find(bob) is not None


def test_reload_checks_are_rate_limited_by_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "keys.toml"
    path.write_text("")
    store = KeyStore(path, clock=clock)
    assert store.maybe_reload() and not store.maybe_reload()
    clock.now += 1.0
    assert store.maybe_reload()
    assert not KeyStore().enabled and not KeyStore().maybe_reload()


def test_environment_key_and_secret_never_show() -> None:
    key = new_key()
    store = KeyStore(env_key=Secret(key))
    found = store.find(key)
    assert found is not None and found.id == "env"
    settings = load_settings({"TOKENRELAY_API_KEY": key, "TOKENRELAY_INTERNAL_SECRET": "s3cret"})
    assert settings.secrets.internal is not None and settings.secrets.internal.matches("s3cret")
    assert key not in repr(settings) and "s3cret" not in repr(settings)


def test_services_refuse_to_listen_openly_without_credentials(tmp_path: Path) -> None:
    settings = load_settings({"TOKENRELAY_EDGE_LISTEN": "0.0.0.0:8080"})
    with pytest.raises(ValueError, match="API keys"):
        check_exposure(settings, "edge")
    check_exposure(load_settings({}), "edge")  # loopback: keyless is allowed
    check_exposure(
        load_settings({"TOKENRELAY_EDGE_LISTEN": "0.0.0.0:8080", "TOKENRELAY_API_KEY": "k"}),
        "edge",
    )
    settings = load_settings({"TOKENRELAY_ORCHESTRATOR_LISTEN": "0.0.0.0:50051"})
    with pytest.raises(ValueError, match="internal secret"):
        check_exposure(settings, "orchestrator")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    settings = load_settings(
        {
            "TOKENRELAY_ORCHESTRATOR_LISTEN": "0.0.0.0:50051",
            "TOKENRELAY_INTERNAL_SECRET_FILE": str(secret_file),
        }
    )
    check_exposure(settings, "orchestrator")
    assert settings.secrets.internal is not None
    assert settings.secrets.internal.matches("from-a-file")
    assert Settings().secrets.internal is None


def test_frames_are_refused_beyond_loopback_even_with_credentials() -> None:
    # The frames hop has no TLS: a secret would cross the network in the clear.
    credentials = {"TOKENRELAY_INTERNAL_SECRET": "s3cret", "TOKENRELAY_API_KEY": "k"}
    for service, variable in (
        ("orchestrator", "TOKENRELAY_ORCHESTRATOR_FRAMES"),
        ("edge", "TOKENRELAY_EDGE_ORCHESTRATOR_FRAMES"),
    ):
        with pytest.raises(ValueError, match="must be loopback"):
            check_exposure(load_settings({variable: "10.0.0.5:50052", **credentials}), service)
        check_exposure(load_settings({variable: "127.0.0.1:50052"}), service)
        check_exposure(load_settings({variable: "localhost:50052"}), service)


def test_keys_command_prints_an_entry_that_accepts_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["new", "--id", "ci", "--owner", "CI bot", "--rpm", "5", "--streams", "2"])
    out, err = capsys.readouterr()
    key = err.split(": ")[-1].strip()
    assert key.startswith("tr-") and key not in out
    path = tmp_path / "keys.toml"
    path.write_text(out)
    found = KeyStore(path).find(key)
    assert found == ApiKey("ci", "CI bot", hash_key(key), 5, 2, False)
