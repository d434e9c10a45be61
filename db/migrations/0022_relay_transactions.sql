-- The relay publishes each step in a Kafka transaction that also carries what the step changes
-- here (a record on `relay.transactions.v1`), then commits those changes with the step's number.
-- A relay taking over compares the last step committed to Kafka with this number: a step Kafka
-- committed and PostgreSQL did not (a relay killed in between) is applied, not published again.
-- `lineage` names this database's line of steps: a step read back from Kafka is applied only if
-- it is of this lineage and the very next step (a database made anew, or restored from a backup,
-- does not take changes that were meant for another).
CREATE TABLE relay_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    step bigint NOT NULL,
    lineage uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO relay_state (step) VALUES (0);
