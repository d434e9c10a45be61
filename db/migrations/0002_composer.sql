-- The composer's state. Everything a batch of inbound events changes is written in ONE
-- transaction: components, composites and their history, outbox rows and consumer offsets.

-- Where each consumer group is in each partition. The composer seeks here on assignment;
-- Kafka's own committed offsets are only a hint that lags behind this table.
CREATE TABLE consumer_offsets (
    consumer_group text   NOT NULL,
    topic          text   NOT NULL,
    partition      int    NOT NULL,
    next_offset    bigint NOT NULL,
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Event ids already applied: a redelivered event changes nothing.
CREATE TABLE applied_events (
    event_id   uuid        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per record of a system of record: the latest version seen, live or deleted.
-- Deleted records keep their version so that an older upsert cannot bring them back.
CREATE TABLE components (
    kind        text        NOT NULL CHECK (kind IN ('demographics', 'medication', 'allergy', 'immunization', 'care_task', 'attribution')),
    source      text        NOT NULL,
    record_id   text        NOT NULL,
    member_id   text        NOT NULL,
    version     bigint      NOT NULL,
    deleted     boolean     NOT NULL,
    -- The FHIR resource (JSON text, exactly as served), or the attribution record; NULL when deleted.
    body        json,
    event_id    uuid        NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (kind, source, record_id)
);
CREATE INDEX components_member ON components (member_id);

-- The current medication profile of each member. A deleted member keeps its row (deleted,
-- no body) so that versionId goes on from where it was if the member comes back.
CREATE TABLE composites (
    member_id     text        PRIMARY KEY,
    version_id    bigint      NOT NULL CHECK (version_id > 0),
    last_updated  timestamptz NOT NULL,
    deleted       boolean     NOT NULL,
    -- SHA-256 of the Bundle without its meta: decides whether content changed.
    content_hash  bytea       NOT NULL,
    body          json
);

-- Every version of every composite, including deletions (tombstones, without body).
CREATE TABLE composite_history (
    member_id     text        NOT NULL,
    version_id    bigint      NOT NULL,
    last_updated  timestamptz NOT NULL,
    deleted       boolean     NOT NULL,
    body          json,
    PRIMARY KEY (member_id, version_id)
);

-- Changes to publish, written in the same transaction as the change itself. The relay
-- publishes in id order (so in version order per member) and marks rows once acknowledged.
CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    topic         text        NOT NULL,   -- contract topic name, without deployment prefix
    message_key   text        NOT NULL,
    event_id      uuid        NOT NULL UNIQUE,
    member_id     text        NOT NULL,
    version_id    bigint      NOT NULL,
    payload       json,                   -- NULL: a tombstone
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
