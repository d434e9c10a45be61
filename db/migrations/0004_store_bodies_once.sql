-- Write volume, not CPU, bounded the composer: each composite version was stored three times
-- (composites, composite_history, outbox). Its body now lives once, in composite_history;
-- the current row and the outbox row refer to it by (member_id, version_id).
ALTER TABLE composites DROP COLUMN body;
ALTER TABLE outbox DROP COLUMN payload;
-- lz4 compresses and decompresses the large JSON values several times faster than pglz.
ALTER TABLE composite_history ALTER COLUMN body SET COMPRESSION lz4;
ALTER TABLE components ALTER COLUMN body SET COMPRESSION lz4;
ALTER TABLE resource_history ALTER COLUMN body SET COMPRESSION lz4;
