"""The run store's schema: the alembic migrations build the models' tables, and stores that medfed
wrote before alembic (``tests/server/data/store_schema*.sql``: SQLite dumps of stores made by the
previous ``server/store.py``, its own ``schema_version`` numbering) open and upgrade in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from medfed.server.dashboard.read_models import RunReader
from medfed.server.store import RunStore, StoreError, head_revision
from medfed.server.store.migrate import MIGRATIONS_DIR
from medfed.server.store.schema import metadata

DATA = Path(__file__).parent / "data"


def _legacy_store(tmp_path: Path, dump: str) -> tuple[Path, str]:
    """A store file restored from a dump of a pre-alembic store; its path and URL."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript((DATA / dump).read_text())
    con.close()
    return path, f"sqlite:///{path}"


def _upgrade_to(url: str, revision: str) -> None:
    """Run the migrations of an empty database up to ``revision`` only (as alembic's CLI would)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _structure(url: str, *, skip: tuple[str, ...] = ("alembic_version", "schema_version")) -> dict[str, Any]:
    """Every table's columns (name, type, nullable, primary key), indexes and foreign keys."""
    engine = sa.create_engine(url)
    inspector = sa.inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(set(inspector.get_table_names()) - set(skip)):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], bool(c.get("primary_key"))) for c in inspector.get_columns(table)
            ],
            "indexes": sorted((ix["name"], tuple(ix["column_names"])) for ix in inspector.get_indexes(table)),
            "foreign_keys": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], (fk.get("options") or {}).get("ondelete"))
                for fk in inspector.get_foreign_keys(table)
            ),
        }
    engine.dispose()
    return out


def _differences(store: RunStore) -> list[Any]:
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_a_new_store_has_the_newest_revision_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs' / 'medfed.db'}"
    with RunStore(url) as store:
        assert store.schema_revision == head_revision() == "0004"
        assert store.journal_mode == "wal"
        assert RunReader(store).list_runs() == []
    with RunStore(url) as again:  # opening an up-to-date store changes nothing
        assert again.schema_revision == head_revision()


def test_a_database_built_by_the_migrations_equals_the_models(tmp_path: Path) -> None:
    with RunStore(f"sqlite:///{tmp_path / 'medfed.db'}") as store:
        assert _differences(store) == []
        tables = set(sa.inspect(store.engine).get_table_names())
    assert tables == set(metadata.tables) | {"alembic_version"}


def test_the_comparison_notices_a_schema_that_differs_from_the_models(tmp_path: Path) -> None:
    with RunStore(f"sqlite:///{tmp_path / 'medfed.db'}") as store:
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX ix_events_run_id_id"))
            conn.execute(sa.text("ALTER TABLE runs ADD COLUMN extra INTEGER"))
        kinds = sorted(diff[0] for diff in _differences(store))
    assert kinds == ["add_index", "remove_column"]


@pytest.mark.parametrize(("dump", "revision"), [("store_schema1.sql", "0001"), ("store_schema2.sql", "0002")])
def test_the_first_revisions_rebuild_the_tables_medfed_made_before_alembic(
    tmp_path: Path, dump: str, revision: str
) -> None:
    _, old_url = _legacy_store(tmp_path, dump)
    new_url = f"sqlite:///{tmp_path / 'new.db'}"
    _upgrade_to(new_url, revision)
    assert _structure(new_url) == _structure(old_url)


def test_a_schema_2_store_from_before_alembic_upgrades_and_keeps_its_run(tmp_path: Path) -> None:
    path, url = _legacy_store(tmp_path, "store_schema2.sql")
    assert "foreign_keys" in _structure(url)["rounds"] and _structure(url)["rounds"]["foreign_keys"] == []
    with RunStore(url) as store:
        assert store.schema_revision == head_revision()
        assert _differences(store) == []
        assert not sa.inspect(store.engine).has_table("schema_version")
        reader = RunReader(store)
        (run,) = reader.list_runs()
        assert (run["id"], run["status"], run["model"], run["rounds_done"]) == ("old-run", "finished", "simplecnn", 1)
        assert [r["round"] for r in reader.rounds("old-run")] == [1]
        sites = {s["site"]: s for s in reader.sites("old-run")}
        assert sites["site-0"]["epsilon"] == 1.5 and sites["site-1"]["num_examples"] == 31.0
        assert [c["kind"] for c in reader.get_run("old-run")["checkpoints"]] == ["best"]
        kinds = [e["kind"] for e in reader.events("old-run")]
        assert kinds == ["run-started", "round-started", "round-finished", "checkpoint", "run-finished"]
        store.add_event("old-run", level="info", kind="note", message="written after the upgrade")
        assert reader.events("old-run", after=5)[0]["kind"] == "note"
        with pytest.raises(IntegrityError), store.engine.begin() as conn:  # revision 0003: foreign keys hold
            conn.execute(sa.text(
                "INSERT INTO checkpoints (run_id, kind, round, metrics, saved) VALUES ('no-such-run', 'best', 1, '{}', 1.0)"
            ))
    assert _structure(url)["rounds"]["foreign_keys"] == [(("run_id",), "runs", "CASCADE")]


def test_a_schema_1_store_is_migrated_and_keeps_its_runs(tmp_path: Path) -> None:
    _, url = _legacy_store(tmp_path, "store_schema1.sql")
    assert "last_update" not in [c[0] for c in _structure(url)["runs"]["columns"]]
    with RunStore(url) as store:
        assert store.schema_revision == head_revision()
        assert _differences(store) == []
        (run,) = RunReader(store).list_runs()
        assert run["id"] == "old-run" and run["model"] == "simplecnn" and run["rounds_done"] == 3
        assert run["last_update"] == 160.0  # filled in by revision 0002 from the finish time
        with store.engine.connect() as conn:
            indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("events")}
        assert "ix_events_run_id_id" in indexes
        store.add_event("old-run", level="info", kind="note", message="written after the migration")
        assert [e["kind"] for e in RunReader(store).events("old-run")] == ["note"]


def test_rows_of_unknown_runs_are_dropped_when_the_foreign_keys_are_added(tmp_path: Path) -> None:
    path, url = _legacy_store(tmp_path, "store_schema2.sql")
    con = sqlite3.connect(path)
    con.execute("INSERT INTO events (run_id, time, level, kind, message) VALUES ('gone', 1.0, 'info', 'x', 'orphan')")
    con.commit()
    con.close()
    with RunStore(url) as store, store.engine.connect() as conn:
        run_ids = set(conn.execute(sa.text("SELECT DISTINCT run_id FROM events")).scalars())
    assert run_ids == {"old-run"}


def test_a_store_from_a_newer_medfed_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'medfed.db'}"
    RunStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match=r"schema revision '9999', newer .*upgrade medfed"):
        RunStore(url)

    path, old_url = _legacy_store(tmp_path, "store_schema2.sql")
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade medfed"):
        RunStore(old_url)
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(99,)]  # rolled back, untouched
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'").fetchall() == []
    con.close()
