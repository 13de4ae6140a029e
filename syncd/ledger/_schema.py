"""The ledger's schema, as the migrations that build it, oldest first.

A file's ``PRAGMA user_version`` counts the migrations applied to it;
:func:`syncd.ledger._db._migrate` applies the rest when the file is opened.
"""

# Migrations are history: never edit one that has shipped, append a new one.
# Each runs in one transaction together with its user_version bump.
_V1_INITIAL = """
CREATE TABLE subjects (
    subject_key TEXT PRIMARY KEY,
    consent     INTEGER CHECK (consent IN (0, 1)),
    consent_at  TEXT,
    restricted  INTEGER NOT NULL DEFAULT 0 CHECK (restricted IN (0, 1)),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE identifiers (
    identifier_key TEXT PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('email', 'phone', 'client_id')),
    subject_key    TEXT NOT NULL REFERENCES subjects (subject_key) ON DELETE CASCADE,
    created_at     TEXT NOT NULL
);
CREATE INDEX identifiers_by_subject ON identifiers (subject_key);

CREATE TABLE subject_state (
    subject_key TEXT NOT NULL REFERENCES subjects (subject_key) ON DELETE CASCADE,
    processor   TEXT NOT NULL,
    digest      TEXT NOT NULL,
    observed_at TEXT NOT NULL,
    PRIMARY KEY (subject_key, processor)
);

CREATE TABLE requests (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('erase', 'restrict', 'unrestrict', 'export')),
    subject_key TEXT NOT NULL,
    source      TEXT NOT NULL,
    received_at TEXT NOT NULL,
    due_at      TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'open'
                CHECK (state IN ('open', 'done', 'failed', 'cancelled')),
    closed_at   TEXT,
    note        TEXT
);
CREATE INDEX requests_by_state_due ON requests (state, due_at);

CREATE TABLE suppression (
    identifier_key TEXT PRIMARY KEY,
    reason         TEXT NOT NULL,
    request_id     INTEGER REFERENCES requests (id),
    created_at     TEXT NOT NULL
);

-- The last CHECK makes "no payload once final" a property of the file, not
-- only of the code that writes it.
CREATE TABLE tasks (
    id                INTEGER PRIMARY KEY,
    subject_key       TEXT NOT NULL,
    processor         TEXT NOT NULL,
    action            TEXT NOT NULL,
    reason            TEXT NOT NULL,
    payload           TEXT,
    state             TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
                      ('pending', 'in_flight', 'done', 'failed', 'needs_person', 'cancelled')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    last_error        TEXT,
    vendor_request_id TEXT,
    request_id        INTEGER REFERENCES requests (id),
    dedupe_key        TEXT UNIQUE,
    CHECK (state IN ('pending', 'in_flight') OR (payload IS NULL AND dedupe_key IS NULL))
);
CREATE INDEX tasks_by_state_due ON tasks (state, next_attempt_at);
CREATE INDEX tasks_by_subject ON tasks (subject_key);
CREATE INDEX tasks_by_request ON tasks (request_id);

-- Append-only evidence (R11). No foreign keys: evidence must outlive the
-- subjects and tasks it mentions.
CREATE TABLE audit (
    id                INTEGER PRIMARY KEY,
    at                TEXT NOT NULL,
    subject_key       TEXT,
    processor         TEXT,
    action            TEXT NOT NULL,
    reason            TEXT,
    outcome           TEXT NOT NULL,
    vendor_request_id TEXT,
    task_id           INTEGER,
    detail            TEXT
);
CREATE INDEX audit_by_subject ON audit (subject_key, at);
CREATE INDEX audit_by_time ON audit (at);

CREATE TABLE cursors (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE alerts (
    id               INTEGER PRIMARY KEY,
    problem_key      TEXT NOT NULL,
    kind             TEXT NOT NULL,
    summary          TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    created_at       TEXT NOT NULL,
    last_notified_at TEXT,
    notify_count     INTEGER NOT NULL DEFAULT 0,
    resolved_at      TEXT
);
CREATE UNIQUE INDEX alerts_one_open_per_problem ON alerts (problem_key) WHERE state = 'open';
"""

# Events pushed to syncd (Mailchimp webhooks), recorded before they are
# answered and processed later. ``payload`` carries the identifiers the event
# names until it is processed, then it is scrubbed; ``dedupe_key`` makes a
# replayed delivery a no-op.
_V2_INBOX = """
CREATE TABLE inbox (
    id           INTEGER PRIMARY KEY,
    source       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    occurred_at  TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    payload      TEXT,
    dedupe_key   TEXT NOT NULL UNIQUE,
    processed_at TEXT,
    outcome      TEXT,
    CHECK (processed_at IS NULL OR payload IS NULL)
);
CREATE INDEX inbox_pending ON inbox (processed_at, id);
"""

# What a full resync learns about a subject's opt-outs and opt-ins (R2), stamped
# with the processor's own times, and whether Mailchimp refused a re-subscribe.
_V3_SUBJECT_OPT_TIMES = """
ALTER TABLE subjects ADD COLUMN opted_out_at TEXT;
ALTER TABLE subjects ADD COLUMN opted_in_at TEXT;
ALTER TABLE subjects ADD COLUMN resubscribe_refused INTEGER NOT NULL DEFAULT 0
    CHECK (resubscribe_refused IN (0, 1));
"""

# synced_email_key: the keyed hash of the address the subject's Mailchimp member was
# last seen or put under, so an email change in Phorest moves that member (R6).
# client_seen: which version of the Phorest record syncd last reconciled (version,
# updatedAt and state; no personal data), so a poll skips changes already handled.
_V4_SUBJECT_SYNC_STATE = """
ALTER TABLE subjects ADD COLUMN synced_email_key TEXT;
ALTER TABLE subjects ADD COLUMN client_seen TEXT;
"""

# processor_health: what the daemon last learned about each processor, kept so
# that ``syncd status`` (another process) and a restarted daemon can see it.
# commands: work an operator asked the running daemon to do (``syncd resync``
# while the daemon holds the writer lock), with its progress and outcome.
# alerts.recovery_notified_at: when the manager was told a problem cleared.
_V5_DAEMON_STATE = """
CREATE TABLE processor_health (
    processor      TEXT PRIMARY KEY,
    last_ok_at     TEXT,
    last_error     TEXT,
    last_error_at  TEXT,
    credentials_ok INTEGER CHECK (credentials_ok IN (0, 1)),
    down_since     TEXT,
    updated_at     TEXT NOT NULL
);

CREATE TABLE commands (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('resync')),
    options      TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'failed')),
    requested_at TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    progress     TEXT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX commands_by_state ON commands (state, id);

ALTER TABLE alerts ADD COLUMN recovery_notified_at TEXT;
"""

# unsubscribed_by_syncd: syncd itself set the subject's member unsubscribed, so
# that status is not a new opt-out by the person and withdraws nobody's consent
# (at a shared address, one client without consent unsubscribes the member).
_V6_OWN_UNSUBSCRIBE = """
ALTER TABLE subjects ADD COLUMN unsubscribed_by_syncd INTEGER NOT NULL DEFAULT 0
    CHECK (unsubscribed_by_syncd IN (0, 1));
"""

# Data-subject requests made real (R3, R7, R11): who filed a request, its
# extension (UK GDPR Art. 12(3): at most two further months, with the reason),
# the Phorest client it resolved to, and one step per processor: a ledger task
# (Mailchimp, GA; one per address or client id) or a manual step a person
# confirms (Phorest's Forget, paper forms), each with its evidence. audit.request_id ties evidence to a request;
# subjects.analytics_erased_at remembers that GA was asked to delete a subject,
# since GA cannot be read back.
_V7_REQUEST_STEPS = """
ALTER TABLE requests ADD COLUMN filed_by TEXT;
ALTER TABLE requests ADD COLUMN client_id TEXT;
ALTER TABLE requests ADD COLUMN extended_months INTEGER NOT NULL DEFAULT 0
    CHECK (extended_months BETWEEN 0 AND 2);
ALTER TABLE requests ADD COLUMN extension_reason TEXT;

CREATE TABLE request_steps (
    id           INTEGER PRIMARY KEY,
    request_id   INTEGER NOT NULL REFERENCES requests (id),
    processor    TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('task', 'manual')),
    state        TEXT NOT NULL DEFAULT 'waiting'
                 CHECK (state IN ('waiting', 'done', 'failed', 'cancelled')),
    task_id      INTEGER REFERENCES tasks (id),
    client_id    TEXT,
    instructions TEXT,
    opened_at    TEXT NOT NULL,
    closed_at    TEXT,
    confirmed_by TEXT,
    evidence     TEXT
);
CREATE INDEX request_steps_by_state ON request_steps (state, request_id);

ALTER TABLE audit ADD COLUMN request_id INTEGER;
CREATE INDEX audit_by_request ON audit (request_id, at);
CREATE INDEX audit_by_task ON audit (task_id);

ALTER TABLE subjects ADD COLUMN analytics_erased_at TEXT;
"""

# Retention purges (R4): every run that was not a dry run, with how many live
# clients it found stale and how many were live in all. A run the purge guard
# held back stays 'guarded' until a person confirms it (then 'confirmed') or a
# later run with another count replaces it ('superseded'); 'filed' runs filed
# their erasure requests. Client counts only, no ids.
_V8_RETENTION_RUNS = """
CREATE TABLE retention_runs (
    id           INTEGER PRIMARY KEY,
    created_at   TEXT NOT NULL,
    stale_count  INTEGER NOT NULL CHECK (stale_count >= 0),
    live_count   INTEGER NOT NULL CHECK (live_count >= 0),
    state        TEXT NOT NULL
                 CHECK (state IN ('guarded', 'confirmed', 'superseded', 'filed')),
    filed_count  INTEGER NOT NULL DEFAULT 0,
    closed_at    TEXT,
    confirmed_by TEXT
);
CREATE INDEX retention_runs_by_state ON retention_runs (state, id);
"""

# The console's staff accounts (argon2id hashes, never a password) and who did
# what: audit.actor is the staff login name of a person's action (a console or
# command-line user), NULL for syncd's own work.
_V9_STAFF = """
CREATE TABLE staff (
    id                  INTEGER PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE COLLATE NOCASE,
    role                TEXT NOT NULL CHECK (role IN ('manager', 'reception')),
    password_hash       TEXT NOT NULL,
    active              INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    failed_logins       INTEGER NOT NULL DEFAULT 0 CHECK (failed_logins >= 0),
    locked_until        TEXT,
    password_changed_at TEXT NOT NULL,
    last_login_at       TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);
ALTER TABLE audit ADD COLUMN actor TEXT;
"""

MIGRATIONS: tuple[str, ...] = (
    _V1_INITIAL, _V2_INBOX, _V3_SUBJECT_OPT_TIMES, _V4_SUBJECT_SYNC_STATE, _V5_DAEMON_STATE,
    _V6_OWN_UNSUBSCRIBE, _V7_REQUEST_STEPS, _V8_RETENTION_RUNS, _V9_STAFF,
)
SCHEMA_VERSION = len(MIGRATIONS)
