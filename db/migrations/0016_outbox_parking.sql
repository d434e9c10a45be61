-- A record the relay cannot publish (larger than the topic takes, or refused by the broker for
-- what it is) is parked: kept, with the reason, out of the relay's way, so that the records
-- after it are published. An operator lists, retries or drops parked rows (`fhirctl outbox`).
-- A dropped row is marked published and keeps its reason, so the drop stays on record.
ALTER TABLE outbox ADD COLUMN parked_at timestamptz, ADD COLUMN park_reason text;
DROP INDEX outbox_unpublished;
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX outbox_parked ON outbox (id) WHERE published_at IS NULL AND parked_at IS NOT NULL;
