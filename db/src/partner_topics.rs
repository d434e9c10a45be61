//! `partner_topic_members`: which members each partner's topic carries, so that the relay adds
//! a member when its attribution starts and sends a tombstone when it ends; and the attribution
//! queries that decide it.

use sqlx::PgConnection;
use time::Date;

/// A member a partner's topic should carry, with its current composite.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Attributed {
    pub partner_id: String,
    pub member_id: String,
    pub version_id: i64,
    pub body: String,
}

/// A member a partner's topic carries but should no longer, with its current versionId (0 when
/// it has no composite).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unattributed {
    pub partner_id: String,
    pub member_id: String,
    pub version_id: i64,
}

/// A member and a partner it is attributed to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Attribution {
    pub member_id: String,
    pub partner_id: String,
}

/// Every partner `members` are attributed to on `day`.
pub async fn partners_of(tx: &mut PgConnection, members: &[String], day: Date) -> crate::Result<Vec<Attribution>> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT member_id, body ->> 'partner_id' AS partner_id FROM components
         WHERE kind = 'attribution' AND NOT deleted AND member_id = ANY($1)
           AND (body ->> 'period_start')::date <= $2 AND coalesce((body ->> 'period_end')::date >= $2, true)",
    )
    .bind(members)
    .bind(day)
    .fetch_all(&mut *tx)
    .await?)
}

/// Records which (partner, member) pairs the partner topics now carry, and which they no longer do.
pub async fn carried(tx: &mut PgConnection, added: &[(String, String)], removed: &[(String, String)]) -> crate::Result<()> {
    // A statement only for what there is: most batches remove nothing.
    if !added.is_empty() {
        let (p, m): (Vec<&str>, Vec<&str>) = added.iter().map(|(p, m)| (p.as_str(), m.as_str())).unzip();
        sqlx::query("INSERT INTO partner_topic_members SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING")
            .bind(&p)
            .bind(&m)
            .execute(&mut *tx)
            .await?;
    }
    if !removed.is_empty() {
        let (p, m): (Vec<&str>, Vec<&str>) = removed.iter().map(|(p, m)| (p.as_str(), m.as_str())).unzip();
        sqlx::query(
            "DELETE FROM partner_topic_members t USING unnest($1::text[], $2::text[]) AS r(p, m) WHERE t.partner_id = r.p AND t.member_id = r.m",
        )
        .bind(&p)
        .bind(&m)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Members whose attribution changed ([`crate::components::attribution_changed`]), oldest first:
/// (row ids, distinct members), at most `limit` rows.
pub async fn attribution_changes(tx: &mut PgConnection, limit: i64) -> crate::Result<(Vec<i64>, Vec<String>)> {
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, member_id FROM attribution_changes ORDER BY id LIMIT $1").bind(limit).fetch_all(&mut *tx).await?;
    let ids = rows.iter().map(|r| r.0).collect();
    let mut members: Vec<String> = rows.into_iter().map(|r| r.1).collect();
    members.sort();
    members.dedup();
    Ok((ids, members))
}

/// Removes handled `attribution_changes` rows.
pub async fn forget_attribution_changes(tx: &mut PgConnection, ids: &[i64]) -> crate::Result<()> {
    sqlx::query("DELETE FROM attribution_changes WHERE id = ANY($1)").bind(ids).execute(&mut *tx).await?;
    Ok(())
}

/// Runs `sql` with `$1` = `day` and `$2` = `limit`, its `{members}` replaced by the condition
/// that `column` is one of `members` (bound as `$3`), or by `true` for every member. Each text
/// is a separate prepared statement, so neither plan has to serve the other case.
async fn for_members<T>(tx: &mut PgConnection, sql: &str, column: &str, day: Date, limit: i64, members: Option<&[String]>) -> crate::Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let condition = if members.is_some() { format!("{column} = ANY($3)") } else { "true".to_owned() };
    let mut query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql.replace("{members}", &condition))).bind(day).bind(limit);
    if let Some(members) = members {
        query = query.bind(members);
    }
    Ok(query.fetch_all(&mut *tx).await?)
}

/// Attributed on `day` with a live composite, but not yet on the partner's topic, at most
/// `limit`; among `members` if given.
pub async fn newly_attributed(tx: &mut PgConnection, day: Date, limit: i64, members: Option<&[String]>) -> crate::Result<Vec<Attributed>> {
    for_members(
        tx,
        "SELECT DISTINCT a.body ->> 'partner_id' AS partner_id, a.member_id, c.version_id, h.body::text AS body
         FROM components a
         JOIN composites c ON c.member_id = a.member_id AND NOT c.deleted
         JOIN composite_history h ON h.member_id = c.member_id AND h.version_id = c.version_id
         WHERE a.kind = 'attribution' AND NOT a.deleted AND {members}
           AND (a.body ->> 'period_start')::date <= $1 AND coalesce((a.body ->> 'period_end')::date >= $1, true)
           AND NOT EXISTS (SELECT 1 FROM partner_topic_members t WHERE t.partner_id = a.body ->> 'partner_id' AND t.member_id = a.member_id)
         LIMIT $2",
        "a.member_id",
        day,
        limit,
        members,
    )
    .await
}

/// On a partner's topic, but no longer attributed to it on `day`, at most `limit`; among
/// `members` if given.
pub async fn no_longer_attributed(tx: &mut PgConnection, day: Date, limit: i64, members: Option<&[String]>) -> crate::Result<Vec<Unattributed>> {
    for_members(
        tx,
        "SELECT t.partner_id, t.member_id, coalesce(c.version_id, 0) AS version_id FROM partner_topic_members t
         LEFT JOIN composites c ON c.member_id = t.member_id
         WHERE {members} AND NOT EXISTS (SELECT 1 FROM components a WHERE a.kind = 'attribution' AND NOT a.deleted
           AND a.member_id = t.member_id AND a.body ->> 'partner_id' = t.partner_id
           AND (a.body ->> 'period_start')::date <= $1 AND coalesce((a.body ->> 'period_end')::date >= $1, true))
         LIMIT $2",
        "t.member_id",
        day,
        limit,
        members,
    )
    .await
}

/// What the relay still has to do: unpublished outbox rows, members to add to partner topics,
/// members to remove from them (tests and benchmarks).
#[cfg(feature = "test-support")]
pub async fn backlog(pool: &sqlx::PgPool, day: Date) -> crate::Result<(i64, usize, usize)> {
    let mut tx = pool.begin().await?;
    let unpublished = crate::outbox::unpublished_count(&mut tx).await?;
    let added = newly_attributed(&mut tx, day, 1_000_000, None).await?.len();
    let removed = no_longer_attributed(&mut tx, day, 1_000_000, None).await?.len();
    tx.rollback().await?;
    Ok((unpublished, added, removed))
}

/// Makes the relay send `partner`'s topic its attributed members' current composites again
/// (`member`: only that one), for `fhirctl replay --partner`: the pairs are forgotten as carried
/// and the members queued as attribution changes, which the relay reconciles when the outbox is
/// drained. Returns how many members are queued.
pub async fn recarry(pool: &sqlx::PgPool, partner: &str, member: Option<&str>) -> crate::Result<u64> {
    let mut tx = pool.begin().await?;
    let members: Vec<String> =
        sqlx::query_scalar("DELETE FROM partner_topic_members WHERE partner_id = $1 AND ($2::text IS NULL OR member_id = $2) RETURNING member_id")
            .bind(partner)
            .bind(member)
            .fetch_all(&mut *tx)
            .await?;
    sqlx::query("INSERT INTO attribution_changes (member_id) SELECT unnest($1::text[])").bind(&members).execute(&mut *tx).await?;
    crate::notify(&mut tx, crate::channels::OUTBOX).await?;
    tx.commit().await?;
    Ok(members.len() as u64)
}
