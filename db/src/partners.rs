//! The partner registry, client-assertion replay protection and issued bearer tokens.

use sqlx::PgPool;
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Partner {
    pub partner_id: String,
    pub name: String,
    /// The JWK Set (`{"keys": [...]}`) as JSON text.
    pub jwks: String,
    pub scopes: Vec<String>,
    pub rate_per_second: Option<f64>,
    pub rate_burst: Option<i32>,
    pub pmm1_key_ids: Vec<String>,
    pub created_at: OffsetDateTime,
    pub disabled_at: Option<OffsetDateTime>,
}

/// What an operator registers (created, or replaced when the id exists; disabling is separate).
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    pub partner_id: &'a str,
    pub name: &'a str,
    pub jwks: &'a str,
    pub scopes: &'a [String],
    pub rate_per_second: Option<f64>,
    pub rate_burst: Option<i32>,
    pub pmm1_key_ids: &'a [String],
}

const PARTNER_COLUMNS: &str = "partner_id, name, jwks::text AS jwks, scopes, rate_per_second, rate_burst, pmm1_key_ids, created_at, disabled_at";

/// Every change to a partner is notified on this channel (payload: the partner id), so that
/// API instances drop what they cached about its tokens at once.
pub const CHANGES: &str = "fhir_partner_changes";

async fn notify(tx: &mut sqlx::PgConnection, partner_id: &str) -> crate::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANGES).bind(partner_id).execute(&mut *tx).await?;
    Ok(())
}

/// A listener on [`CHANGES`].
pub async fn listen_changes(pool: &PgPool) -> crate::Result<sqlx::postgres::PgListener> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(CHANGES).await?;
    Ok(listener)
}

pub async fn register(pool: &PgPool, p: &Registration<'_>) -> crate::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO partners (partner_id, name, jwks, scopes, rate_per_second, rate_burst, pmm1_key_ids)
         VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)
         ON CONFLICT (partner_id) DO UPDATE SET name = EXCLUDED.name, jwks = EXCLUDED.jwks,
           scopes = EXCLUDED.scopes, rate_per_second = EXCLUDED.rate_per_second,
           rate_burst = EXCLUDED.rate_burst, pmm1_key_ids = EXCLUDED.pmm1_key_ids",
    )
    .bind(p.partner_id)
    .bind(p.name)
    .bind(p.jwks)
    .bind(p.scopes)
    .bind(p.rate_per_second)
    .bind(p.rate_burst)
    .bind(p.pmm1_key_ids)
    .execute(&mut *tx)
    .await?;
    notify(&mut tx, p.partner_id).await?;
    tx.commit().await?;
    Ok(())
}

pub async fn list(pool: &PgPool) -> crate::Result<Vec<Partner>> {
    let sql = format!("SELECT {PARTNER_COLUMNS} FROM partners ORDER BY partner_id");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?)
}

pub async fn get(pool: &PgPool, partner_id: &str) -> crate::Result<Option<Partner>> {
    let sql = format!("SELECT {PARTNER_COLUMNS} FROM partners WHERE partner_id = $1");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(partner_id).fetch_optional(pool).await?)
}

/// Disables (or enables again) a partner; a disabled partner's tokens stop working at once.
/// Returns whether the partner exists.
pub async fn set_disabled(pool: &PgPool, partner_id: &str, disabled: bool) -> crate::Result<bool> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query("UPDATE partners SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, now()) END WHERE partner_id = $1")
        .bind(partner_id)
        .bind(disabled)
        .execute(&mut *tx)
        .await?;
    notify(&mut tx, partner_id).await?;
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// Records a client assertion's `jti`; false when the partner already used it (a replay).
/// Assertions that expired are forgotten on the way (they can no longer be replayed).
pub async fn use_assertion(pool: &PgPool, partner_id: &str, jti: &str, expires_at: OffsetDateTime) -> crate::Result<bool> {
    sqlx::query("DELETE FROM used_assertions WHERE expires_at < now() - interval '10 minutes'").execute(pool).await?;
    let done = sqlx::query("INSERT INTO used_assertions (partner_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(partner_id)
        .bind(jti)
        .bind(expires_at)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores an issued token by its hash.
pub async fn issue_token(
    pool: &PgPool,
    token_hash: &[u8],
    partner_id: &str,
    scopes: &[String],
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
) -> crate::Result<()> {
    sqlx::query("DELETE FROM access_tokens WHERE expires_at < now() - interval '1 day'").execute(pool).await?;
    sqlx::query("INSERT INTO access_tokens (token_hash, partner_id, scopes, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(token_hash)
        .bind(partner_id)
        .bind(scopes)
        .bind(issued_at)
        .bind(expires_at)
        .execute(pool)
        .await?;
    Ok(())
}

/// A token as the API checks it on every request.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Grant {
    pub partner_id: String,
    pub scopes: Vec<String>,
    pub expires_at: OffsetDateTime,
    pub rate_per_second: Option<f64>,
    pub rate_burst: Option<i32>,
    pub pmm1_key_ids: Vec<String>,
}

/// The grant behind a token hash, if the token was issued and its partner is not disabled
/// (expired grants are returned: the caller says why it refuses).
pub async fn grant(pool: &PgPool, token_hash: &[u8]) -> crate::Result<Option<Grant>> {
    Ok(sqlx::query_as(
        "SELECT t.partner_id, t.scopes, t.expires_at, p.rate_per_second, p.rate_burst, p.pmm1_key_ids
         FROM access_tokens t JOIN partners p USING (partner_id)
         WHERE t.token_hash = $1 AND p.disabled_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await?)
}
