-- W3C trace context of each composite version (the composer's span of the change that made
-- it, child of the system of record's `traceparent` or a trace it started), carried to the
-- published records and, through the subscription queues, to notifications.
ALTER TABLE outbox ADD COLUMN traceparent text;
ALTER TABLE subscription_events ADD COLUMN traceparent text;
