from __future__ import annotations

from pathlib import Path

import pytest

from service.store.factory import sqlite_path, store_from_url
from service.store.postgres import PostgresStore
from service.store.sqlite import SQLiteStore


def test_absolute_sqlite_url(tmp_path):
    store = store_from_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "db.sqlite"


def test_relative_sqlite_url_is_resolved_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///state/db.sqlite") == tmp_path / "state" / "db.sqlite"
    assert sqlite_path("sqlite:////abs/db.sqlite") == Path("/abs/db.sqlite")


@pytest.mark.parametrize("url", ["postgresql://u:secret@h/db", "postgres://h/db?sslmode=require"])
def test_postgresql_urls_build_the_postgres_store(url):
    store = store_from_url(url)
    assert isinstance(store, PostgresStore)
    assert store.url == url


@pytest.mark.parametrize("url", ["sqlite:///", "mysql://h/db", "sqlite://relative"])
def test_other_urls_are_refused(url):
    with pytest.raises(ValueError, match="sqlite:///"):
        store_from_url(url)
