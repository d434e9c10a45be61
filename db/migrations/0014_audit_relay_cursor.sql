-- The audit relay follows the trail itself, in the order its transactions ended, instead of an
-- outbox row per audit event.
-- - Why: every audited request inserted an outbox row (heap and index), and the relay then locked
--   and deleted it, and autovacuum cleaned it up: about a third of the WAL of an audited
--   `$medication-profile` read, on the path every partner read waits for.
-- - How: each event carries the id of the transaction that wrote it (`txid`). The relay keeps one
--   cursor (`audit_relay`: the last event published, as (txid, id)) and publishes the events
--   after it whose transaction is older than every transaction still running
--   (`pg_snapshot_xmin`), so no event can still commit behind the cursor: none is skipped, and
--   a long transaction only delays the events after it.
-- - Existing events keep txid 0 (no rewrite of the append-only table). The cursor starts before
--   the oldest event still in the outbox, or after the last event when it was empty; events that
--   an earlier relay published out of order after that point are published once more (delivery
--   was, and stays, at least once: consumers dedupe by `event_id`).
ALTER TABLE audit_events ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
ALTER TABLE audit_events ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
CREATE INDEX audit_events_txid ON audit_events (txid, id);

CREATE TABLE audit_relay (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    txid      xid8    NOT NULL,
    id        bigint  NOT NULL
);
INSERT INTO audit_relay (txid, id)
SELECT '0', coalesce((SELECT min(audit_id) - 1 FROM audit_outbox), (SELECT max(id) FROM audit_events), 0);

DROP TABLE audit_outbox;
