-- Insights: DetectedIssues derived from each member's medication profile (fhir::insights).
-- Each is a component of kind 'insight' (source 'insights'), so it is versioned, served
-- (read, vread, _history, search by patient, code, status, _lastUpdated), scoped by attribution
-- and audited exactly like the records it comes from, and written in the same transaction.
ALTER TABLE components DROP CONSTRAINT components_kind_check;
ALTER TABLE components ADD CONSTRAINT components_kind_check
    CHECK (kind IN ('demographics', 'medication', 'allergy', 'immunization', 'care_task', 'attribution', 'provenance', 'insight'));

-- Each member's record on fhir.insights.v1: a collection Bundle of all its DetectedIssues in
-- their current versions, versioned like composites. The outbox row of a version carries the
-- body as its payload; this row keeps the current one for partner topics that start carrying
-- the member later.
CREATE TABLE insight_bundles (
    member_id    text COLLATE "C" PRIMARY KEY,
    version_id   bigint NOT NULL,
    content_hash bytea NOT NULL,
    last_updated timestamptz NOT NULL,
    body         text NOT NULL
);

-- Time alone changes insights (a maintenance drug's supply runs out): the day each member is to
-- be evaluated again, without an event.
CREATE TABLE insight_rechecks (
    member_id  text COLLATE "C" PRIMARY KEY,
    recheck_on date NOT NULL
);
CREATE INDEX insight_rechecks_due ON insight_rechecks (recheck_on);

-- The knowledge bases insights were derived with: when a new one is loaded, the members whose
-- medications or allergies it judges differently are recomputed (not all members).
CREATE TABLE insight_knowledge_bases (
    version   text PRIMARY KEY,
    digest    text NOT NULL,
    body      text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    -- When every affected member was recomputed with it (NULL: not yet).
    applied_at timestamptz
);

-- The insights' SubscriptionTopic: "a new or changed insight for my members". The outbox row of
-- an insights Bundle version names the DetectedIssue versions it brought (`changes`: id,
-- version, code, severity), which the notifier fans out to subscriptions of that topic whose
-- filters they pass (severity, code, patient).
ALTER TABLE outbox ADD COLUMN changes jsonb;
CREATE INDEX outbox_unnotified_insights ON outbox (id) WHERE notified_at IS NULL AND changes IS NOT NULL;
ALTER TABLE subscriptions ADD COLUMN severities text[], ADD COLUMN codes text[];
-- An event about a DetectedIssue names it (its version is `version_id`); NULL: a composite's.
ALTER TABLE subscription_events ADD COLUMN resource_id text COLLATE "C";
