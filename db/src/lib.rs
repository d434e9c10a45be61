//! PostgreSQL: the numbered migrations in `db/migrations` and the named queries every other
//! crate uses, one module per family of tables; rows are read into named structs. No SQL lives
//! outside this crate. Queries only tests and benchmarks run are behind the `test-support`
//! feature, out of the components' builds.

pub mod audit;
#[cfg(feature = "test-support")]
pub mod bench;
pub mod components;
pub mod composites;
#[cfg(feature = "test-support")]
pub mod heartbeat;
pub mod insights;
pub mod matching;
pub mod offsets;
pub mod outbox;
pub mod partner_topics;
pub mod partners;
pub mod rate_limits;
pub mod resources;
pub mod retention;
pub mod subscriptions;
pub mod writeback;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::time::Duration;

pub use sqlx::PgPool as Pool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, Error>;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(30);

/// The statement timeout of pools made by [`connect`] (tests, benchmarks, tools);
/// the components take theirs from `DATABASE_STATEMENT_TIMEOUT_MS` ([`connect_configured`]).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool for `url`. Statement logging is off: bound values can carry PHI.
///
/// Statements keep the plans PostgreSQL caches for them. A generic plan made while a table was
/// nearly empty (sequential scans at an estimated cost of 0) lasts until autovacuum analyzes the
/// table, which invalidates it: within `autovacuum_naptime` once the table has grown (10 s in
/// `services/postgresql.conf`). Planning every statement anew instead (`plan_cache_mode =
/// force_custom_plan`) cost more CPU than it saved, and renewing connections to renew their
/// plans stalled every statement behind the new backend (docs/benchmarks.md).
///
/// Every statement has a timeout ([`DEFAULT_STATEMENT_TIMEOUT`] here): one that runs longer is
/// cancelled and fails, so no request or batch waits on PostgreSQL without end.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_with(connect_options(url, DEFAULT_STATEMENT_TIMEOUT, &[])?).await?)
}

/// As [`connect`], with the component's configured URL and statement timeout.
pub async fn connect_configured(common: &platform::CommonConfig, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_with(connect_options(&common.database_url, common.statement_timeout(), &[])?).await?)
}

/// As [`connect_configured`], connecting when first used.
pub fn connect_lazy(common: &platform::CommonConfig, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_lazy_with(connect_options(&common.database_url, common.statement_timeout(), &[])?))
}

/// A pool for the statements that serve many requests at once (`resources::medication_profiles`),
/// which are planned once, generically: each call binds arrays of another length, and
/// PostgreSQL, seeing a cheaper custom plan for every length, would otherwise plan every call
/// anew, which costs more than running it. It connects when first used.
pub fn connect_for_batches(common: &platform::CommonConfig, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_lazy_with(generic_plans(common)?))
}

/// As [`connect_configured`], for a stage behind the composer (relay, notifier) whose statements
/// bind arrays of another length every batch: planned once, generically, as
/// [`connect_for_batches`] does. Planned anew per batch, planning took a sixth of PostgreSQL's
/// CPU in steady flow (docs/benchmarks.md). Not the composer's: its batches of up to 10,000
/// members ran 12 % slower on generic plans.
pub async fn connect_for_stage(common: &platform::CommonConfig, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_with(generic_plans(common)?).await?)
}

/// The configured connection, with every statement planned once, generically.
fn generic_plans(common: &platform::CommonConfig) -> Result<PgConnectOptions> {
    connect_options(&common.database_url, common.statement_timeout(), &[("plan_cache_mode", "force_generic_plan")])
}

fn connect_options(url: &str, statement_timeout: Duration, settings: &[(&str, &str)]) -> Result<PgConnectOptions> {
    let timeout = statement_timeout.as_millis().to_string();
    let settings = settings.iter().copied().chain([("statement_timeout", timeout.as_str())]);
    Ok(PgConnectOptions::from_str(url)?.disable_statement_logging().options(settings))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    // A round trip to test every connection before each use would double the queries of a
    // point read; a connection that sat idle long enough to have been dropped is tested instead
    // (and one that broke in use is discarded by sqlx at its error).
    PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(5)).test_before_acquire(false).before_acquire(
        |conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        },
    )
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn url_with_database(url: &str, name: &str) -> Result<String> {
    let (without_query, query) = url.split_once('?').unwrap_or((url, ""));
    let (prefix, _) =
        without_query.rsplit_once('/').ok_or_else(|| Error::Sqlx(sqlx::Error::Configuration("the database URL has no database name".into())))?;
    Ok(if query.is_empty() { format!("{prefix}/{name}") } else { format!("{prefix}/{name}?{query}") })
}

/// Applies every migration not yet applied (idempotent), without the statement timeout: a
/// migration may rewrite a large table.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET statement_timeout = 0").execute(&mut *conn).await?;
    let result = MIGRATOR.run(&mut *conn).await;
    sqlx::query("RESET statement_timeout").execute(&mut *conn).await?;
    result?;
    Ok(())
}

/// Cheap liveness query for readiness checks.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// Creates an empty database (tests make a fresh one each). The name is checked to be a plain
/// identifier before it is put into the statement.
pub async fn create_database(pool: &PgPool, name: &str) -> Result<()> {
    let plain = !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !plain {
        return Err(Error::Sqlx(sqlx::Error::Protocol(format!("not a plain database name: {name:?}"))));
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(pool).await?;
    Ok(())
}

/// `NOTIFY` channels that wake the relay and the notifier as soon as a transaction commits
/// new work, instead of at their next poll (which remains the fallback).
pub mod channels {
    /// New outbox rows (composite versions, partner write-backs).
    pub const OUTBOX: &str = "fhir_outbox";
    /// New events on subscription queues.
    pub const SUBSCRIPTION_EVENTS: &str = "fhir_subscription_events";
}

/// Queues a notification on `channel`, delivered when the transaction commits (none on rollback).
pub async fn notify(tx: &mut sqlx::PgConnection, channel: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(channel).execute(&mut *tx).await?;
    Ok(())
}

/// Waits for a notification on some channels, or at most a given time: a loop that polls
/// reacts at once to committed work, and still polls if the listening connection is lost.
pub struct Wakeup {
    listener: Option<sqlx::postgres::PgListener>,
}

impl Wakeup {
    /// Listens on `channels`; if that fails, [`Wakeup::wait`] only sleeps.
    pub async fn new(pool: &PgPool, channels: &[&str]) -> Wakeup {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
            l.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(l) => Wakeup { listener: Some(l) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN; polling only");
                Wakeup { listener: None }
            }
        }
    }

    /// Returns when a notification arrives (and drains those already queued), or after `max`.
    pub async fn wait(&mut self, max: Duration) {
        match &mut self.listener {
            Some(l) => {
                if let Ok(Err(_)) = tokio::time::timeout(max, l.recv()).await {
                    // The connection was lost; PgListener reconnects on the next recv. Do not spin.
                    tokio::time::sleep(max).await;
                }
                while l.next_buffered().is_some() {}
            }
            None => tokio::time::sleep(max).await,
        }
    }
}

/// Adds PostgreSQL to an operations listener: a `postgres` readiness check, and the pool's
/// connections in use and idle (`fhir_db_pool_connections{state}`) and its size limit. A pool
/// with every connection in use and requests waiting is saturated.
pub fn observe(ops: &mut platform::ops::Ops, pool: &PgPool) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let connections = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    let max = Gauge::<i64>::default();
    max.set(i64::from(pool.options().get_max_connections()));
    ops.registry().register("db_pool_connections", "PostgreSQL pool connections by state (in_use, idle)", connections.clone());
    ops.registry().register("db_pool_max_connections", "The PostgreSQL pool's size limit", max);
    let p = pool.clone();
    ops.check("postgres", move || {
        let p = p.clone();
        async move { ping(&p).await.map_err(|e| format!("PostgreSQL: {e}")) }
    });
    let p = pool.clone();
    ops.on_scrape(move || {
        let (size, idle) = (i64::from(p.size()), p.num_idle() as i64);
        connections.get_or_create(&vec![("state", "in_use")]).set(size - idle);
        connections.get_or_create(&vec![("state", "idle")]).set(idle);
        std::future::ready(())
    });
}
