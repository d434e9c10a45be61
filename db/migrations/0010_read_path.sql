-- The read path under load.
-- A member's live attribution rows, by member alone: a statement that checks many (member,
-- partner) pairs at once finds each member's one or two attribution rows here, instead of
-- reading all of the member's components.
CREATE INDEX components_attribution_member ON components (member_id) WHERE kind = 'attribution' AND NOT deleted;

-- Audit outbox rows are written by the same statement as their audit events (from its
-- RETURNING ids), so the foreign key only cost a key-share lock on every new audit row.
ALTER TABLE audit_outbox DROP CONSTRAINT audit_outbox_audit_id_fkey;
