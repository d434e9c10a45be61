//! FHIR Subscriptions: the stored subscriptions, their queues (one per subscription), the
//! fan-out of composite versions into those queues, and the delivery bookkeeping.

use sqlx::{PgConnection, PgPool};
use time::{Date, OffsetDateTime};

/// A stored subscription.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Subscription {
    pub id: String,
    pub partner_id: String,
    pub topic: String,
    pub member_id: Option<String>,
    /// `rest-hook` or `kafka`.
    pub channel: String,
    pub endpoint: Option<String>,
    pub secret: Option<Vec<u8>>,
    pub headers: Vec<String>,
    /// `empty`, `id-only` or `full-resource`.
    pub content: String,
    pub heartbeat_secs: Option<i32>,
    pub timeout_secs: i32,
    pub max_count: i32,
    /// `requested`, `active`, `error` or `off`.
    pub status: String,
    pub error: Option<String>,
    pub events_since_start: i64,
    pub body: String,
    pub created_at: OffsetDateTime,
    pub end_at: Option<OffsetDateTime>,
    pub last_sent_at: Option<OffsetDateTime>,
    pub failing_since: Option<OffsetDateTime>,
    pub attempts: i32,
    pub delivery_failures: i64,
    /// Insights topic filters (`None`: any severity, any code).
    pub severities: Option<Vec<String>>,
    pub codes: Option<Vec<String>>,
    /// Set by [`claim_due`] only: the end of the lease the claim found still held, when the last
    /// claimant neither recorded its delivery nor released the lease (it stopped, or lost
    /// PostgreSQL, mid-delivery). Its notification may have gone out.
    #[sqlx(default)]
    pub interrupted_lease: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, partner_id, topic, member_id, channel, endpoint, secret, headers, content, heartbeat_secs, timeout_secs, \
    max_count, status, error, events_since_start, body::text AS body, created_at, end_at, last_sent_at, failing_since, attempts, delivery_failures, severities, codes";

/// Stores `s` unless its partner already holds `max_per_partner` subscriptions (other than
/// `off`); returns whether it was stored. Creations of one partner are serialized, so the
/// count holds.
pub async fn create(pool: &PgPool, s: &Subscription, max_per_partner: i64) -> crate::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fhir-event-platform subscriptions of ' || $1))")
        .bind(&s.partner_id)
        .execute(&mut *tx)
        .await?;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE partner_id = $1 AND status <> 'off'")
        .bind(&s.partner_id)
        .fetch_one(&mut *tx)
        .await?;
    if held >= max_per_partner {
        return Ok(false);
    }
    insert(&mut tx, s).await?;
    tx.commit().await?;
    Ok(true)
}

async fn insert(tx: &mut PgConnection, s: &Subscription) -> crate::Result<()> {
    sqlx::query(
        "INSERT INTO subscriptions (id, partner_id, topic, member_id, channel, endpoint, secret, headers, content, heartbeat_secs,
                                    timeout_secs, max_count, status, body, created_at, end_at, severities, codes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::json, $15, $16, $17, $18)",
    )
    .bind(&s.id)
    .bind(&s.partner_id)
    .bind(&s.topic)
    .bind(&s.member_id)
    .bind(&s.channel)
    .bind(&s.endpoint)
    .bind(&s.secret)
    .bind(&s.headers)
    .bind(&s.content)
    .bind(s.heartbeat_secs)
    .bind(s.timeout_secs)
    .bind(s.max_count)
    .bind(&s.status)
    .bind(&s.body)
    .bind(s.created_at)
    .bind(s.end_at)
    .bind(&s.severities)
    .bind(&s.codes)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A partner's subscription (another partner's is not found).
pub async fn get(pool: &PgPool, partner_id: &str, id: &str) -> crate::Result<Option<Subscription>> {
    let sql = format!("SELECT {COLUMNS} FROM subscriptions WHERE id = $1 AND partner_id = $2");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).bind(partner_id).fetch_optional(pool).await?)
}

/// A partner's subscriptions, optionally with one status, by id.
pub async fn list(pool: &PgPool, partner_id: &str, status: Option<&str>) -> crate::Result<Vec<Subscription>> {
    let sql = format!("SELECT {COLUMNS} FROM subscriptions WHERE partner_id = $1 AND ($2::text IS NULL OR status = $2) ORDER BY id LIMIT 1000");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(partner_id).bind(status).fetch_all(pool).await?)
}

/// Deletes a partner's subscription and its queue; false when there was none.
pub async fn delete(pool: &PgPool, partner_id: &str, id: &str) -> crate::Result<bool> {
    let n = sqlx::query("DELETE FROM subscriptions WHERE id = $1 AND partner_id = $2").bind(id).bind(partner_id).execute(pool).await?.rows_affected();
    Ok(n == 1)
}

/// Serializes fan-outs: one notifier numbers events at a time, so event numbers follow the
/// outbox order.
async fn lock_fan_out(tx: &mut PgConnection) -> crate::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fhir-event-platform subscription fan-out'))").execute(&mut *tx).await?;
    Ok(())
}

/// The SubscriptionTopics events are fanned out for: their canonical URLs, as stored on
/// subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct Topics<'a> {
    /// A member's composite has a new version.
    pub profile: &'a str,
    /// A member has a new or changed insight (a DetectedIssue version).
    pub insights: &'a str,
}

/// Turns up to `limit` new outbox rows into events on the queues of the subscriptions that
/// match them, in one transaction: a composite version for each subscription to the profile
/// topic, and each DetectedIssue version an insights Bundle brought for each subscription to
/// the insights topic whose severity and code filters it passes. Either way the member is
/// attributed to the subscription's partner on `day`, and the `patient` filter, if any, names
/// the member. Returns the number of outbox rows handled and of events queued.
pub async fn fan_out(pool: &PgPool, day: Date, limit: i64, topics: Topics<'_>) -> crate::Result<(usize, u64)> {
    let mut tx = pool.begin().await?;
    lock_fan_out(&mut tx).await?;
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM (
           (SELECT o.id FROM outbox o WHERE o.notified_at IS NULL AND o.payload IS NULL ORDER BY o.id LIMIT $1)
           UNION ALL
           (SELECT o.id FROM outbox o WHERE o.notified_at IS NULL AND o.changes IS NOT NULL ORDER BY o.id LIMIT $1)) r
         ORDER BY id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok((0, 0));
    }
    // The member is attributed to the subscription's partner on `day` ($2), probed per row (as
    // an EXISTS it may be planned as a hash of all of a partner's attributions, per batch).
    let attribution = crate::resources::attribution_of("r.member_id", "s.partner_id", "$2");
    let sql = format!(
        "WITH rows AS (
           SELECT o.id, 0::bigint AS ord, o.member_id, o.version_id, h.deleted, h.last_updated, o.traceparent,
                  NULL::text AS resource_id, NULL::text AS code, NULL::text AS severity, $3::text AS topic
           FROM outbox o JOIN composite_history h USING (member_id, version_id) WHERE o.id = ANY($1) AND o.payload IS NULL
           UNION ALL
           SELECT o.id, c.ord, o.member_id, (c.change ->> 'version')::bigint, false, o.created_at, o.traceparent,
                  c.change ->> 'id', c.change ->> 'code', c.change ->> 'severity', $4::text
           FROM outbox o, jsonb_array_elements(o.changes) WITH ORDINALITY AS c(change, ord) WHERE o.id = ANY($1) AND o.changes IS NOT NULL
         ),
         matches AS (
           SELECT s.id AS sid, r.* FROM rows r JOIN subscriptions s ON (s.member_id IS NULL OR s.member_id = r.member_id)
           JOIN LATERAL ({attribution}) a ON true
           WHERE s.topic = r.topic AND s.status <> 'off'
             AND (r.severity IS NULL OR s.severities IS NULL OR r.severity = ANY(s.severities))
             AND (r.code IS NULL OR s.codes IS NULL OR r.code = ANY(s.codes))
         ),
         numbered AS (SELECT m.*, row_number() OVER (PARTITION BY sid ORDER BY id, ord) AS n FROM matches m),
         counts AS (SELECT sid, count(*) AS c FROM numbered GROUP BY sid),
         bumped AS (
           UPDATE subscriptions s SET events_since_start = s.events_since_start + counts.c
           FROM counts WHERE s.id = counts.sid RETURNING s.id, s.events_since_start - counts.c AS base
         )
         INSERT INTO subscription_events (subscription_id, event_number, member_id, version_id, deleted, occurred_at, traceparent, resource_id)
         SELECT n.sid, b.base + n.n, n.member_id, n.version_id, n.deleted, n.last_updated, n.traceparent, n.resource_id
         FROM numbered n JOIN bumped b ON b.id = n.sid"
    );
    let queued = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(day)
        .bind(topics.profile)
        .bind(topics.insights)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("UPDATE outbox SET notified_at = now() WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
    if queued > 0 {
        crate::notify(&mut tx, crate::channels::SUBSCRIPTION_EVENTS).await?;
    }
    tx.commit().await?;
    Ok((ids.len(), queued))
}

/// Claims up to `limit` subscriptions that have something to send now (a handshake, events, or
/// a heartbeat), for `lease` seconds: the claimant delivers, then calls [`delivered`] or
/// [`failed`]. A crashed claimant's lease runs out and another notifier takes over (and learns
/// the lease was interrupted: [`Subscription::interrupted_lease`]).
///
/// A partner gets at most `per_partner` deliveries in flight: `busy` says how many each partner
/// has in flight already (on this notifier), so one partner's slow or dead endpoints hold only
/// its own share of the slots. Subscriptions of a disabled partner are not delivered.
///
/// A Kafka-channel subscription's lease lasts at least `lease + kafka_delivery_secs`: a claimant's
/// record that outlived its lease must have failed, not be still on its way.
///
/// A subscription another transaction holds (the fan-out bumping its counter, another
/// notifier's claim) is skipped until the next claim: a claim that waited for the fan-out while
/// holding rows the fan-out wants next would deadlock with it.
pub async fn claim_due(
    pool: &PgPool,
    (lease_secs, kafka_delivery_secs): (i32, i32),
    limit: i64,
    per_partner: i64,
    busy: &[(String, i64)],
) -> crate::Result<Vec<Subscription>> {
    let (partners, counts): (Vec<&str>, Vec<i64>) = busy.iter().map(|(p, n)| (p.as_str(), *n)).unzip();
    let sql = format!(
        "UPDATE subscriptions s SET leased_until = now() + make_interval(secs => $1 + CASE WHEN s.channel = 'kafka' THEN greatest(s.timeout_secs, $6) ELSE s.timeout_secs END)
         FROM (
          SELECT l.id, l.leased_until AS previous_lease FROM subscriptions l WHERE l.id IN (
           SELECT r.id FROM (
             SELECT t.id, t.partner_id, t.next_attempt_at, row_number() OVER (PARTITION BY t.partner_id ORDER BY t.next_attempt_at) AS n
             FROM subscriptions t
             WHERE t.status IN ('requested', 'active') AND t.next_attempt_at <= now()
               AND (t.leased_until IS NULL OR t.leased_until < now())
               AND (t.status = 'requested'
                    OR EXISTS (SELECT 1 FROM subscription_events e WHERE e.subscription_id = t.id AND e.delivered_at IS NULL)
                    OR (t.heartbeat_secs IS NOT NULL AND coalesce(t.last_sent_at, t.created_at) + make_interval(secs => t.heartbeat_secs) <= now()))
               AND NOT EXISTS (SELECT 1 FROM partners p WHERE p.partner_id = t.partner_id AND p.disabled_at IS NOT NULL)
           ) r LEFT JOIN unnest($3::text[], $4::int8[]) AS busy(partner_id, n) ON busy.partner_id = r.partner_id
           WHERE r.n <= $5 - coalesce(busy.n, 0)
           ORDER BY r.next_attempt_at LIMIT $2)
          FOR UPDATE OF l SKIP LOCKED
         ) chosen
         WHERE s.id = chosen.id AND (s.leased_until IS NULL OR s.leased_until < now())
         RETURNING {}, chosen.previous_lease AS interrupted_lease",
        COLUMNS.split(", ").map(|c| format!("s.{c}")).collect::<Vec<_>>().join(", ")
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(lease_secs)
        .bind(limit)
        .bind(&partners)
        .bind(&counts)
        .bind(per_partner)
        .bind(kafka_delivery_secs)
        .fetch_all(pool)
        .await?)
}

/// One event of a subscription's queue, with the composite version it is about.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Event {
    pub event_number: i64,
    pub member_id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub occurred_at: OffsetDateTime,
    /// The composite (when asked for, not deleted, and the member still attributed).
    pub body: Option<String>,
    /// Whether the member is attributed to the subscription's partner now (when the event is
    /// sent or replayed, not only when it was queued): if not, the event says nothing about it.
    pub attributed: bool,
    /// The W3C trace context of the change (`platform::trace`).
    pub traceparent: Option<String>,
    /// The DetectedIssue an insights event is about (its version is `version_id`); `None`: the
    /// member's composite.
    pub resource_id: Option<String>,
}

/// Events chosen by `selection` (a condition, order and limit on `subscription_events`), each
/// with whether its member is attributed to `$partner` on `$day` and, when `with_bodies` (a
/// parameter) is true and it is, its composite's body, looked up by its key.
///
/// The attribution is looked up per event (a lateral index probe). As an `EXISTS`, the planner
/// may hash every attribution of the partner once per query instead: 60 ms for a partner of
/// 60,000 members, paid by each delivery, so a notifier that fell behind never caught up.
fn event_query(partner: &str, day: &str, with_bodies: &str, selection: &str) -> sqlx::AssertSqlSafe<String> {
    let attribution = crate::resources::attribution_of("e.member_id", partner, day);
    sqlx::AssertSqlSafe(format!(
        "SELECT e.event_number, e.member_id, e.version_id, e.deleted, e.occurred_at,
                CASE WHEN {with_bodies} AND e.attributed AND e.resource_id IS NULL
                       THEN (SELECT h.body::text FROM composite_history h WHERE h.member_id = e.member_id AND h.version_id = e.version_id)
                     WHEN {with_bodies} AND e.attributed
                       THEN (SELECT r.body::text FROM resource_history r WHERE r.resource_type = 'DetectedIssue'
                             AND r.resource_id = e.resource_id AND r.version_id = e.version_id) END AS body,
                e.attributed, e.traceparent, e.resource_id
         FROM (SELECT e.*, a.member_id IS NOT NULL AS attributed
               FROM (SELECT * FROM subscription_events WHERE {selection}) e
               LEFT JOIN LATERAL ({attribution}) a ON true) e
         ORDER BY e.event_number"
    ))
}

/// [`event_query`]'s selection for [`pending`]: a subscription's oldest undelivered events.
const PENDING: &str = "subscription_id = $1 AND delivered_at IS NULL ORDER BY event_number LIMIT $2";

/// The oldest undelivered events of a subscription of `partner`, in order, at most `limit`.
pub async fn pending(pool: &PgPool, id: &str, partner: &str, day: Date, limit: i64, with_bodies: bool) -> crate::Result<Vec<Event>> {
    Ok(sqlx::query_as(event_query("$4", "$5", "$3", PENDING)).bind(id).bind(limit).bind(with_bodies).bind(partner).bind(day).fetch_all(pool).await?)
}

/// The plan [`pending`] ran with, executed (`EXPLAIN (ANALYZE, FORMAT JSON)`), for tests that
/// check how much a delivery reads.
#[cfg(feature = "test-support")]
pub async fn explain_pending(pool: &PgPool, id: &str, partner: &str, day: Date, limit: i64) -> crate::Result<serde_json::Value> {
    let sql = event_query("$4", "$5", "$3", PENDING);
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", sql.0);
    let (plan,): (serde_json::Value,) =
        sqlx::query_as(sqlx::AssertSqlSafe(explain)).bind(id).bind(limit).bind(false).bind(partner).bind(day).fetch_one(pool).await?;
    Ok(plan)
}

/// Events `since..=until` of a subscription of `partner` (delivered or not), at most `limit`
/// ($events).
#[allow(clippy::too_many_arguments)]
pub async fn events(
    pool: &PgPool,
    id: &str,
    partner: &str,
    day: Date,
    since: i64,
    until: i64,
    limit: i64,
    with_bodies: bool,
) -> crate::Result<Vec<Event>> {
    Ok(sqlx::query_as(event_query("$6", "$7", "$5", "subscription_id = $1 AND event_number BETWEEN $2 AND $3 ORDER BY event_number LIMIT $4"))
        .bind(id)
        .bind(since)
        .bind(until)
        .bind(limit)
        .bind(with_bodies)
        .bind(partner)
        .bind(day)
        .fetch_all(pool)
        .await?)
}

/// A notification was accepted: events up to `through` are delivered (none for a handshake or
/// heartbeat), the subscription is active, its failures are over and its lease released.
pub async fn delivered(pool: &PgPool, id: &str, through: Option<i64>) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    if let Some(n) = through {
        sqlx::query("UPDATE subscription_events SET delivered_at = now() WHERE subscription_id = $1 AND event_number <= $2 AND delivered_at IS NULL")
            .bind(id)
            .bind(n)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "UPDATE subscriptions SET status = CASE WHEN status = 'requested' THEN 'active' ELSE status END, last_sent_at = now(),
           failing_since = NULL, attempts = 0, error = NULL, next_attempt_at = now(), leased_until = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A notification failed: try again at `retry_at`, or, when `give_up`, put the subscription in
/// `error` (its queue is kept, for `$events`).
pub async fn failed(pool: &PgPool, id: &str, error: &str, retry_at: OffsetDateTime, give_up: bool) -> crate::Result<()> {
    sqlx::query(
        "UPDATE subscriptions SET attempts = attempts + 1, delivery_failures = delivery_failures + 1,
           failing_since = coalesce(failing_since, now()), error = $2, next_attempt_at = $3, leased_until = NULL,
           status = CASE WHEN $4 THEN 'error' ELSE status END WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_at)
    .bind(give_up)
    .execute(pool)
    .await?;
    Ok(())
}

/// Releases a lease without a delivery (nothing was due after all).
pub async fn release(pool: &PgPool, id: &str) -> crate::Result<()> {
    sqlx::query("UPDATE subscriptions SET leased_until = NULL WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// Subscriptions whose `end` has passed are turned off.
pub async fn end_expired(pool: &PgPool) -> crate::Result<u64> {
    Ok(sqlx::query("UPDATE subscriptions SET status = 'off' WHERE end_at IS NOT NULL AND end_at <= now() AND status <> 'off'")
        .execute(pool)
        .await?
        .rows_affected())
}

/// What operators watch of the notifier's work: composite versions not yet turned into
/// subscription events, and per partner and subscription status the events not yet delivered
/// and the delivery failures so far.
#[derive(Debug, Clone, Default)]
pub struct Queues {
    pub unnotified: i64,
    pub partners: Vec<PartnerQueue>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PartnerQueue {
    pub partner_id: String,
    pub status: String,
    pub subscriptions: i64,
    pub undelivered: i64,
    pub delivery_failures: i64,
}

pub async fn queues(pool: &PgPool) -> crate::Result<Queues> {
    let unnotified: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE notified_at IS NULL AND payload IS NULL").fetch_one(pool).await?;
    let partners = sqlx::query_as(
        "SELECT s.partner_id, s.status, count(*) AS subscriptions,
                coalesce(sum((SELECT count(*) FROM subscription_events e WHERE e.subscription_id = s.id AND e.delivered_at IS NULL)), 0)::int8 AS undelivered,
                coalesce(sum(s.delivery_failures), 0)::int8 AS delivery_failures
         FROM subscriptions s GROUP BY s.partner_id, s.status ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    Ok(Queues { unnotified, partners })
}
