-- The audit trail's planner statistics from a smaller sample.
-- - Why: ANALYZE samples 300 rows per unit of the largest statistics target among a table's
--   columns, 30,000 at the default 100, and computes each column's statistics over them (the
--   member arrays' most common elements the dearest). On a 5.3 M-row trail that took 0.53-1.26 s
--   of one core each time, and autovacuum analyzes the trail after every 10 % of growth: on a
--   young trail every 10-20 s under load, 0.3-0.4 s of CPU each. On a two-core machine a request
--   arriving meanwhile shares the other core with everything else.
-- - How: a target of 25 on every column (7,500 rows sampled) took 0.11-0.24 s on the same trail,
--   a fifth, in runs interleaved with the default's.
--   The searches on the trail (by partner, by member, by time, in id order) kept their plans; at
--   10 (44-53 ms) a member's search walked the primary key instead of the member index.
ALTER TABLE audit_events
    ALTER COLUMN id SET STATISTICS 25,
    ALTER COLUMN recorded_at SET STATISTICS 25,
    ALTER COLUMN partner_id SET STATISTICS 25,
    ALTER COLUMN operation SET STATISTICS 25,
    ALTER COLUMN resource_type SET STATISTICS 25,
    ALTER COLUMN member_ids SET STATISTICS 25,
    ALTER COLUMN method SET STATISTICS 25,
    ALTER COLUMN path SET STATISTICS 25,
    ALTER COLUMN status SET STATISTICS 25,
    ALTER COLUMN outcome SET STATISTICS 25,
    ALTER COLUMN key_id SET STATISTICS 25,
    ALTER COLUMN decision SET STATISTICS 25,
    ALTER COLUMN txid SET STATISTICS 25;
