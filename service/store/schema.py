"""The SQLite schema, as an ordered list of migrations keyed by PRAGMA user_version.

Kept in Python rather than a .sql file so it ships inside the package without package-data
configuration. Migration `n` takes a database from user_version `n` to `n + 1`; a released
migration is never edited, only followed by a new one.
"""

from __future__ import annotations

_V1 = (
    """
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        source      TEXT NOT NULL,
        dedupe_key  TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        event_type  TEXT NOT NULL,
        body        BLOB NOT NULL,
        headers     BLOB NOT NULL,
        received_at REAL NOT NULL,
        status      TEXT NOT NULL,
        reason      TEXT,
        UNIQUE (source, dedupe_key)
    )
    """,
    "CREATE INDEX events_received_at ON events (received_at)",
    """
    CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY,
        job_id           TEXT NOT NULL UNIQUE,
        event_row        INTEGER NOT NULL REFERENCES events (id),
        event_id         TEXT NOT NULL DEFAULT '',
        source           TEXT NOT NULL,
        route            TEXT NOT NULL,
        state            TEXT NOT NULL,
        export_name      TEXT NOT NULL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL,
        export_body      BLOB,
        project_id       TEXT,
        api              TEXT NOT NULL DEFAULT 'v3',
        callback_token   TEXT,
        progress         REAL NOT NULL DEFAULT 0,
        download_url     TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        submitted_at     REAL,
        ready_at         REAL,
        last_progress_at REAL,
        next_attempt_at  REAL,
        error_code       TEXT,
        error_message    TEXT,
        video_path       TEXT,
        video_sha256     TEXT,
        polls            INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX jobs_state ON jobs (state, created_at, seq)",
    "CREATE INDEX jobs_created ON jobs (created_at, seq)",
    "CREATE INDEX jobs_event_row ON jobs (event_row)",
    """
    CREATE TABLE transitions (
        id         INTEGER PRIMARY KEY,
        job_id     TEXT NOT NULL REFERENCES jobs (job_id),
        from_state TEXT,
        to_state   TEXT NOT NULL,
        at         REAL NOT NULL,
        note       TEXT
    )
    """,
    "CREATE INDEX transitions_job ON transitions (job_id, id)",
    """
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        job_id          TEXT NOT NULL REFERENCES jobs (job_id),
        -- The job's round: an operator's retry renews the export name, and each round
        -- announces its outcome once per target (the UNIQUE below).
        export_name     TEXT NOT NULL,
        target          TEXT NOT NULL,
        event_type      TEXT NOT NULL,
        payload         BLOB NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        status          TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'dead')),
        last_error      TEXT,
        created_at      REAL NOT NULL,
        delivered_at    REAL,
        UNIQUE (job_id, target, event_type, export_name)
    )
    """,
    "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
    """
    CREATE TABLE heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at REAL NOT NULL
    )
    """,
)

_V2 = (
    # Dead letters: "rejected" events are now called what they are, keep the step that failed,
    # and count the operator's replays; listing by status reads the status index.
    "UPDATE events SET status = 'dead_lettered' WHERE status = 'rejected'",
    "ALTER TABLE events ADD COLUMN failed_step TEXT",
    "ALTER TABLE events ADD COLUMN replays INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX events_status ON events (status, id)",
)

_V3 = (
    # Ownership: a job is claimed by one worker (owner) until its lease ends; every claim
    # bumps the fence, and a transition naming an older fence is refused.
    "ALTER TABLE jobs ADD COLUMN owner TEXT",
    "ALTER TABLE jobs ADD COLUMN lease_until REAL",
    "ALTER TABLE jobs ADD COLUMN fence INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX jobs_owner ON jobs (owner)",
    # What the tracker learned of each template's render time: its first poll comes then.
    """
    CREATE TABLE render_estimates (
        key        TEXT PRIMARY KEY,
        seconds    REAL NOT NULL,
        samples    INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
)

_V4 = (
    # One row per paid call committed (the spending caps count these); a move that proves
    # the call created nothing deletes its row in the same transaction. No foreign key to
    # jobs: the dedupe purge deletes old finished jobs, and a month's cap still counts them.
    """
    CREATE TABLE spend (
        id          INTEGER PRIMARY KEY,
        job_id      TEXT NOT NULL,
        route       TEXT NOT NULL,
        export_name TEXT NOT NULL,
        at          REAL NOT NULL
    )
    """,
    "CREATE INDEX spend_at ON spend (at, route)",
    "CREATE INDEX spend_job ON spend (job_id, id)",
    # The render cache: a job's canonical body digest, and the job whose video it reused.
    "ALTER TABLE jobs ADD COLUMN render_key TEXT",
    "ALTER TABLE jobs ADD COLUMN reused_from TEXT",
    "CREATE INDEX jobs_render_key ON jobs (render_key, ready_at)",
    # Coalescing: jobs of one key supersede each other until one is submitted.
    "ALTER TABLE jobs ADD COLUMN coalesce_key TEXT",
    "ALTER TABLE jobs ADD COLUMN superseded_by TEXT",
    "CREATE INDEX jobs_coalesce_key ON jobs (coalesce_key, seq)",
    # A `budget.exhausted` announcement is made once per period: the period's row says so.
    """
    CREATE TABLE budget_alerts (
        period TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        at     REAL NOT NULL
    )
    """,
)

_V5 = (
    # History rows find their job by its `seq`, not its id. Job ids are digests, so an index
    # on them takes each new job's first history row on a page of its own; a new job's `seq`
    # is above every existing one, so its row lands beside the last one. That was a fifth of
    # the pages, and of the CPU, of each group commit at intake (README, Performance).
    # `job_id` stays, unindexed, for reading; the foreign key moves to `job_seq`, whose index
    # it needs. A file with history rows of missing jobs is refused (PRECHECKS), not pruned.
    """
    CREATE TABLE transitions_v5 (
        id         INTEGER PRIMARY KEY,
        job_seq    INTEGER NOT NULL REFERENCES jobs (seq),
        job_id     TEXT NOT NULL,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        at         REAL NOT NULL,
        note       TEXT
    )
    """,
    (
        "INSERT INTO transitions_v5 (id, job_seq, job_id, from_state, to_state, at, note)"
        " SELECT t.id, j.seq, t.job_id, t.from_state, t.to_state, t.at, t.note"
        " FROM transitions t JOIN jobs j ON j.job_id = t.job_id"
    ),
    "DROP TABLE transitions",
    "ALTER TABLE transitions_v5 RENAME TO transitions",
    "CREATE INDEX transitions_job ON transitions (job_seq, id)",
    # Three job columns are NULL until a job is prepared or claimed, and read only by value:
    # their indexes leave the NULLs out, so a new job is three index inserts fewer.
    "DROP INDEX jobs_owner",
    "CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL",
    "DROP INDEX jobs_render_key",
    "CREATE INDEX jobs_render_key ON jobs (render_key, ready_at) WHERE render_key IS NOT NULL",
    "DROP INDEX jobs_coalesce_key",
    "CREATE INDEX jobs_coalesce_key ON jobs (coalesce_key, seq) WHERE coalesce_key IS NOT NULL",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4, _V5)
"""Statements of each migration; `MIGRATIONS[n]` moves user_version from n to n + 1."""

PRECHECKS: dict[int, tuple[str, str]] = {
    4: (
        (
            "SELECT COUNT(*) FROM transitions t"
            " WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = t.job_id)"
        ),
        (
            "{count} history rows name jobs that do not exist (the file was edited with"
            " foreign keys off?); migration 5 would have to drop them. `PRAGMA"
            " foreign_key_check(transitions)` lists them: delete or repair them, then start"
            " again"
        ),
    ),
}
"""Before `MIGRATIONS[n]`: a count that must be 0, and what to say when it is not.

A migration that cannot carry a row over refuses to start instead of dropping it.
"""

SCHEMA_VERSION = len(MIGRATIONS)
