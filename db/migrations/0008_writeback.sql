-- Partner write-back: partners report MedicationStatements and AllergyIntolerances for their
-- attributed members. A report is a component like any other (kind `medication` or `allergy`)
-- whose source is `partner:<partner_id>` (system-of-record sources cannot contain ':'), so it
-- is served, searched and versioned like the rest and joins the member's composite.
-- Each accepted write also records a `Provenance` resource, also a component.
ALTER TABLE components DROP CONSTRAINT components_kind_check;
ALTER TABLE components ADD CONSTRAINT components_kind_check
    CHECK (kind IN ('demographics', 'medication', 'allergy', 'immunization', 'care_task', 'attribution', 'provenance'));

-- Conditional create (`If-None-Exist: identifier=system|value`): a partner's identifier names
-- at most one of its resources of a type. The key makes concurrent retries create one resource.
CREATE TABLE partner_identifiers (
    partner_id    text NOT NULL,
    resource_type text NOT NULL,
    system        text NOT NULL,
    value         text NOT NULL,
    resource_id   text NOT NULL,
    PRIMARY KEY (partner_id, resource_type, system, value)
);

-- The outbox also carries messages that are not composite versions (`partner.inbound.v1`):
-- those have their own payload and headers. Composite rows keep both NULL and refer to
-- composite_history as before.
ALTER TABLE outbox ADD COLUMN payload json, ADD COLUMN headers jsonb;
