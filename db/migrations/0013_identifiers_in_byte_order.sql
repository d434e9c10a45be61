-- Identifiers compare byte by byte (collation "C"), whatever the database's default collation.
-- - Speed: under a libc locale (even C.UTF-8) every comparison in a text index goes through
--   strcoll on NUL-terminated copies of both values. A component write inserts into six such
--   indexes; on this project's machines, inserts into them took about 25 % less time under "C".
-- - Meaning: ids, codes and topic names have no linguistic order. Keyset paging (`resource_id >
--   $after`) and every ORDER BY on them now give the same order on any deployment, and the
--   same order as the platform's own sorting in Rust.
-- The columns that are joined to each other change together, so every join still compares
-- under one collation and can use its indexes. Types do not change, so no table is rewritten;
-- the indexes on these columns are rebuilt.
ALTER TABLE components
    ALTER COLUMN kind          TYPE text COLLATE "C",
    ALTER COLUMN source        TYPE text COLLATE "C",
    ALTER COLUMN record_id     TYPE text COLLATE "C",
    ALTER COLUMN member_id     TYPE text COLLATE "C",
    ALTER COLUMN resource_type TYPE text COLLATE "C",
    ALTER COLUMN resource_id   TYPE text COLLATE "C",
    ALTER COLUMN code_system   TYPE text COLLATE "C",
    ALTER COLUMN code          TYPE text COLLATE "C";
ALTER TABLE resource_history
    ALTER COLUMN resource_type TYPE text COLLATE "C",
    ALTER COLUMN resource_id   TYPE text COLLATE "C",
    ALTER COLUMN member_id     TYPE text COLLATE "C";
ALTER TABLE composites ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE composite_history ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE outbox
    ALTER COLUMN topic       TYPE text COLLATE "C",
    ALTER COLUMN message_key TYPE text COLLATE "C",
    ALTER COLUMN member_id   TYPE text COLLATE "C";
ALTER TABLE consumer_offsets
    ALTER COLUMN consumer_group TYPE text COLLATE "C",
    ALTER COLUMN topic          TYPE text COLLATE "C";
ALTER TABLE attribution_changes ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE partner_topic_members ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE match_index
    ALTER COLUMN key_id    TYPE text COLLATE "C",
    ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE subscriptions ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE subscription_events ALTER COLUMN member_id TYPE text COLLATE "C";
ALTER TABLE partner_identifiers
    ALTER COLUMN resource_type TYPE text COLLATE "C",
    ALTER COLUMN resource_id   TYPE text COLLATE "C";

-- One index fewer per component write: the index by member (for assembling composites) and
-- the one by patient (for `?patient=` searches) become one, member first. Both readers ask
-- only for live rows; the search still walks resource ids in order within a member and type.
DROP INDEX components_member;
DROP INDEX components_by_patient;
CREATE INDEX components_by_member ON components (member_id, resource_type, resource_id) WHERE NOT deleted;

-- An outbox event id is unique by construction: derived from the topic, member and versionId
-- (unique by composite_history's key), or for write-back from the resource's type, id and
-- version (unique by resource_history's key). Nothing looks rows up by it, and its unique
-- index cost a random-key insert per composite version.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
