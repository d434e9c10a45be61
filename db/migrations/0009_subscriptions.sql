-- FHIR topic-based Subscriptions (R4B + Subscriptions Backport) on medication-profile changes.
-- Each subscription has its own queue (subscription_events): one slow or dead endpoint never
-- delays another, and past notifications stay available to $events.
CREATE TABLE subscriptions (
    id                 text        PRIMARY KEY,
    partner_id         text        NOT NULL,
    topic              text        NOT NULL,
    -- The `patient` filter; NULL: every member attributed to the partner.
    member_id          text,
    channel            text        NOT NULL CHECK (channel IN ('rest-hook', 'kafka')),
    endpoint           text,
    -- HMAC-SHA256 key for the signature header of rest-hook notifications (never served).
    secret             bytea,
    -- Extra headers the partner asked for (`channel.header`), sent with each notification.
    headers            text[]      NOT NULL DEFAULT '{}',
    content            text        NOT NULL CHECK (content IN ('empty', 'id-only', 'full-resource')),
    heartbeat_secs     int,
    timeout_secs       int         NOT NULL,
    max_count          int         NOT NULL,
    status             text        NOT NULL CHECK (status IN ('requested', 'active', 'error', 'off')),
    error              text,
    events_since_start bigint      NOT NULL DEFAULT 0,
    -- The Subscription as accepted (without the secret), served on read.
    body               json        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    end_at             timestamptz,
    -- Delivery state: when the last notification (of any type) was sent, when the current run
    -- of failures began, and until when a notifier holds the subscription.
    last_sent_at       timestamptz,
    failing_since      timestamptz,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    attempts           int         NOT NULL DEFAULT 0,
    delivery_failures  bigint      NOT NULL DEFAULT 0,
    leased_until       timestamptz
);
CREATE INDEX subscriptions_partner ON subscriptions (partner_id);

CREATE TABLE subscription_events (
    subscription_id text        NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    event_number    bigint      NOT NULL,
    member_id       text        NOT NULL,
    -- The composite version this event is about (its body is in composite_history).
    version_id      bigint      NOT NULL,
    deleted         boolean     NOT NULL,
    occurred_at     timestamptz NOT NULL,
    delivered_at    timestamptz,
    PRIMARY KEY (subscription_id, event_number)
);
CREATE INDEX subscription_events_pending ON subscription_events (subscription_id, event_number) WHERE delivered_at IS NULL;

-- Which composite versions of the outbox have been turned into subscription events. Versions
-- from before subscriptions existed have no subscriber.
ALTER TABLE outbox ADD COLUMN notified_at timestamptz;
UPDATE outbox SET notified_at = now();
CREATE INDEX outbox_unnotified ON outbox (id) WHERE notified_at IS NULL AND payload IS NULL;
