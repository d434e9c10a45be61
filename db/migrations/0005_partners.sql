-- Partners (SMART Backend Services clients), the tokens issued to them, attribution-scoped
-- access and the audit trail.

-- The partner registry. Operators register, list and disable partners with the `partners`
-- command. A disabled partner gets no token, and the tokens it holds stop working.
CREATE TABLE partners (
    partner_id     text        PRIMARY KEY CHECK (partner_id ~ '^[A-Za-z0-9.-]{1,64}$'),
    name           text        NOT NULL,
    -- The partner's public keys: a JWK Set ({"keys": [...]}), RS384 or ES384.
    jwks           jsonb       NOT NULL,
    -- Scopes the partner may be granted, e.g. {system/*.read}.
    scopes         text[]      NOT NULL,
    -- Token bucket: sustained requests per second and burst; NULL takes the API's default.
    rate_per_second double precision CHECK (rate_per_second > 0),
    rate_burst     integer     CHECK (rate_burst > 0),
    -- PMM1 key ids the partner may use for $hashed-match.
    pmm1_key_ids   text[]      NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    disabled_at    timestamptz
);

-- Client assertion ids already used: a `jti` is accepted once per partner. Rows are only
-- needed until the assertion expires (at most five minutes).
CREATE TABLE used_assertions (
    partner_id  text        NOT NULL REFERENCES partners,
    jti         text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (partner_id, jti)
);
CREATE INDEX used_assertions_expiry ON used_assertions (expires_at);

-- Bearer tokens issued by POST /auth/token. Only their SHA-256 is stored.
CREATE TABLE access_tokens (
    token_hash  bytea       PRIMARY KEY,
    partner_id  text        NOT NULL REFERENCES partners,
    scopes      text[]      NOT NULL,
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX access_tokens_expiry ON access_tokens (expires_at);

-- Which partner serves which member: the live attribution records, looked up per request.
CREATE INDEX components_attribution ON components ((body ->> 'partner_id'), member_id)
    WHERE kind = 'attribution' AND NOT deleted;

-- The audit trail: who (partner), what (operation, resource type, member ids), when and the
-- outcome, for every request to /fhir and /auth/token. Append-only (see the trigger).
CREATE TABLE audit_events (
    id             bigserial   PRIMARY KEY,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    partner_id     text,                 -- NULL: the caller was not authenticated
    operation      text        NOT NULL, -- read, vread, history, search, operation, token, match, write
    resource_type  text,
    member_ids     text[]      NOT NULL DEFAULT '{}',
    method         text        NOT NULL,
    path           text        NOT NULL, -- without the query string
    status         smallint    NOT NULL,
    outcome        text        NOT NULL  -- success, refused, not-found, invalid, error
);
CREATE INDEX audit_events_partner ON audit_events (partner_id, id);
CREATE INDEX audit_events_member ON audit_events USING gin (member_ids);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Audit events not yet on the audit.events.v1 topic, written in the same statement as the
-- event; the API's relay deletes a row once the broker acknowledged it.
CREATE TABLE audit_outbox (
    audit_id bigint PRIMARY KEY REFERENCES audit_events
);
