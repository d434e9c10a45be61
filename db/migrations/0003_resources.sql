-- FHIR REST over components: each component that is a FHIR resource carries its resource
-- type and id, a version counter (meta.versionId) and the search columns; every version of
-- every resource is kept in resource_history for vread and _history.
ALTER TABLE components
    ADD COLUMN resource_type    text,
    ADD COLUMN resource_id      text,
    ADD COLUMN resource_version bigint NOT NULL DEFAULT 0,
    ADD COLUMN code_system      text,
    ADD COLUMN code             text,
    ADD COLUMN status           text;

CREATE INDEX components_resource ON components (resource_type, resource_id);
-- Keyset paging is by resource id within a type; these serve the search parameters.
CREATE INDEX components_by_patient ON components (resource_type, member_id, resource_id) WHERE NOT deleted;
CREATE INDEX components_by_code ON components (resource_type, code, resource_id) WHERE NOT deleted;
CREATE INDEX components_by_updated ON components (resource_type, updated_at) WHERE NOT deleted;

CREATE TABLE resource_history (
    resource_type text        NOT NULL,
    resource_id   text        NOT NULL,
    version_id    bigint      NOT NULL,
    member_id     text        NOT NULL,
    last_updated  timestamptz NOT NULL,
    deleted       boolean     NOT NULL,
    body          json,
    PRIMARY KEY (resource_type, resource_id, version_id)
);
