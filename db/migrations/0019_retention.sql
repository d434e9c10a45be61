-- Retention removes applied event ids by age: a BRIN index on `applied_at` finds the old ones
-- without a scan of the table, and costs the composer's inserts next to nothing (rows arrive in
-- time order, so a block range summary stays small).
CREATE INDEX applied_events_applied_at ON applied_events USING brin (applied_at);
