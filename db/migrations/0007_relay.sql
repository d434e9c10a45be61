-- The relay publishes the outbox to fhir.medication-profile.v1 and to each partner's topic.
-- This table says which members a partner's topic carries now, so that when an attribution
-- ends (deleted, or its period is over) the relay sends that partner a tombstone.
CREATE TABLE partner_topic_members (
    partner_id text NOT NULL,
    member_id  text NOT NULL,
    PRIMARY KEY (partner_id, member_id)
);
CREATE INDEX partner_topic_members_member ON partner_topic_members (member_id);
