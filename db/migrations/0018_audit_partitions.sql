-- The audit trail partitioned by month (of `recorded_at`, UTC), so that retention can export a
-- month and then detach and drop its partition, instead of deleting from an append-only table.
-- - Each partition is append-only as the table was (the trigger is on the partitioned table and
--   applies to every partition); DETACH and DROP are not row changes.
-- - A trail that already holds events becomes one partition, `audit_events_before_<YYYY_MM>`,
--   holding everything before that month's end (attached as it is: no copy of the rows); it is
--   exported and dropped as a whole once its last month is past retention. An empty trail is
--   replaced outright.
-- - Monthly partitions `audit_events_<YYYY_MM>` are created three months ahead (here, then by
--   `db::audit::ensure_partitions` at every API start and retention run); `audit_events_default`
--   catches an event no partition covers, so that auditing never fails for want of one.
-- - The primary key includes the partition key, as PostgreSQL requires: (id, recorded_at).
ALTER SEQUENCE audit_events_id_seq OWNED BY NONE;
ALTER TABLE audit_events RENAME TO audit_events_unpartitioned;
ALTER INDEX audit_events_pkey RENAME TO audit_events_unpartitioned_pkey;
ALTER INDEX audit_events_partner RENAME TO audit_events_unpartitioned_partner;
ALTER INDEX audit_events_member RENAME TO audit_events_unpartitioned_member;
ALTER INDEX audit_events_txid RENAME TO audit_events_unpartitioned_txid;

CREATE TABLE audit_events (
    id             bigint      NOT NULL DEFAULT nextval('audit_events_id_seq'),
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    partner_id     text,
    operation      text        NOT NULL,
    resource_type  text,
    member_ids     text[]      NOT NULL DEFAULT '{}',
    method         text        NOT NULL,
    path           text        NOT NULL,
    status         smallint    NOT NULL,
    outcome        text        NOT NULL,
    key_id         text,
    decision       text,
    txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at);
ALTER SEQUENCE audit_events_id_seq OWNED BY audit_events.id;
CREATE INDEX audit_events_partner ON audit_events (partner_id, id);
CREATE INDEX audit_events_member ON audit_events USING gin (member_ids);
CREATE INDEX audit_events_txid ON audit_events (txid, id);
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- One month's partition, if missing, with the trail's smaller statistics sample (0015: a
-- partition does not inherit its table's per-column targets).
CREATE FUNCTION create_audit_partition(month timestamptz) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    start timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := 'audit_events_' || to_char(start AT TIME ZONE 'UTC', 'YYYY_MM');
    col text;
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)', name, start, start + interval '1 month');
    FOREACH col IN ARRAY ARRAY['id', 'recorded_at', 'partner_id', 'operation', 'resource_type', 'member_ids', 'method', 'path',
                                'status', 'outcome', 'key_id', 'decision', 'txid'] LOOP
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET STATISTICS 25', name, col);
    END LOOP;
END $$;

DO $$
DECLARE
    this_month timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    first_month timestamptz := this_month;
BEGIN
    IF EXISTS (SELECT 1 FROM audit_events_unpartitioned) THEN
        first_month := this_month + interval '1 month';
        -- The old table's own triggers go: the partitioned table's apply to it once attached.
        DROP TRIGGER audit_events_append_only ON audit_events_unpartitioned;
        DROP TRIGGER audit_events_no_truncate ON audit_events_unpartitioned;
        -- A partition's key must be the table's: (id, recorded_at) instead of (id).
        ALTER TABLE audit_events_unpartitioned DROP CONSTRAINT audit_events_unpartitioned_pkey;
        ALTER TABLE audit_events_unpartitioned ADD PRIMARY KEY (id, recorded_at);
        EXECUTE format('ALTER TABLE audit_events_unpartitioned RENAME TO %I', 'audit_events_before_' || to_char(first_month AT TIME ZONE 'UTC', 'YYYY_MM'));
        EXECUTE format('ALTER TABLE audit_events ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       'audit_events_before_' || to_char(first_month AT TIME ZONE 'UTC', 'YYYY_MM'), first_month);
    ELSE
        DROP TABLE audit_events_unpartitioned;
    END IF;
    FOR i IN 0..2 LOOP
        PERFORM create_audit_partition(first_month + make_interval(months => i));
    END LOOP;
    CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT;
END $$;
