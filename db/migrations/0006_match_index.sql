-- PMM1 hashed-identity matching (../shared/identity/PMM1.md). For each configured key id, the
-- stored values (HMAC of the server pepper over each token) of every member's tokens. No
-- token, key or demographic value is stored. A value held by more than one member is
-- ambiguous and never used (the lookup ignores it).
CREATE TABLE match_index (
    key_id     text     NOT NULL,
    stored     bytea    NOT NULL,
    token_type smallint NOT NULL CHECK (token_type BETWEEN 1 AND 5),
    member_id  text     NOT NULL,
    PRIMARY KEY (key_id, stored, member_id)
);
CREATE INDEX match_index_member ON match_index (member_id);

-- $hashed-match requests are audited with the key id and the decision (never the tokens).
ALTER TABLE audit_events ADD COLUMN key_id text, ADD COLUMN decision text;
