-- Platform bookkeeping. A round-trip through this table is how the foundation tests prove the
-- migrated database answers; operators can read which migrations and components ran.
CREATE TABLE service_heartbeats (
    component   text        PRIMARY KEY,
    instance    uuid        NOT NULL,
    started_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL
);
