-- Members whose attribution changed, written by the composer in the transaction of the change.
-- The relay reconciles those members' partner topics and deletes the rows, instead of comparing
-- every attribution with every partner topic once a second: at 30,000 attributions those two
-- reads took 86 ms on an idle database, and the outbox waited behind them. The relay still
-- compares everything when it starts and when the date changes (attribution periods follow
-- the calendar).
CREATE TABLE attribution_changes (
    id        bigserial PRIMARY KEY,
    member_id text      NOT NULL
);
