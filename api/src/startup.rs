//! Builds the application: so that `main` and every integration test start the same thing,
//! on a given (or random) port, against a given database and broker.

use crate::audit::{self, writer::Auditor};
use crate::auth::Auth;
use crate::auth::rate::{Limit, SharedLimiter};
use crate::config::Config;
use crate::doc::ApiDoc;
use crate::http;
use crate::matcher::Matcher;
use crate::profile_reads::ProfileReads;
use crate::state::{AppState, Shared};
use axum::Router;
use rdkafka::consumer::BaseConsumer;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

/// The routes of every handler, in the document's frame.
fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(http::router())
}

/// The OpenAPI document generated from the handlers (committed at `openapi/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().split_for_parts().1
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    limits: crate::server::ServerLimits,
    ops_addr: std::net::SocketAddr,
}

impl Application {
    /// Connects to PostgreSQL (running migrations when `migrate` is set), prepares the Kafka
    /// client and binds the listener. Fails if PostgreSQL cannot be reached at start.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        config.common.check_limits().map_err(anyhow::Error::msg)?;
        let pool = db::connect_configured(&config.common, config.common.database_max_connections).await?;
        db::migrate(&pool).await?;
        // The audit trail's monthly partitions ahead of time (retention does it too; a month
        // without one goes to the default partition, never fails a request).
        if let Err(e) = db::audit::ensure_partitions(&pool, 2).await {
            tracing::error!(error = %e, "audit partitions for the coming months could not be created");
        }
        Self::build_with_pool(config, pool).await
    }

    /// As `build`, with an existing pool (which may point at a database that is down).
    pub async fn build_with_pool(config: &Config, pool: db::Pool) -> anyhow::Result<Self> {
        let kafka: BaseConsumer = platform::kafka::client(&config.common.kafka)?
            .set("client.id", "fhir-api-ready")
            .set("socket.timeout.ms", "3000")
            .set("log_level", "3")
            .create()?;
        let base_url = config.common.fhir_base_url.trim_end_matches('/').to_owned();
        let auth = Auth {
            token_url: config.token_url(),
            token_lifetime: Duration::from_secs(config.auth_token_lifetime_secs),
            default_limit: Limit { rate: config.rate_limit_per_second, burst: f64::from(config.rate_limit_burst) },
            limiter: SharedLimiter::new(pool.clone()),
            address_limit: Limit { rate: config.address_rate_limit_per_second, burst: f64::from(config.address_rate_limit_burst) },
            address_limiter: Default::default(),
            grants: Default::default(),
        };
        auth.grants.follow(pool.clone());
        let matcher = config.pmm1.pepper().map_err(anyhow::Error::msg)?.map(|pepper| {
            let limit = Limit { rate: config.match_rate_limit_per_second, burst: f64::from(config.match_rate_limit_burst) };
            Arc::new(Matcher::new(pepper.bytes(), Duration::from_millis(config.match_latency_floor_ms), limit))
        });
        // The audit trail has connections of its own: requests that hold the request pool's
        // connections (or wait for them) cannot keep accesses from being recorded.
        let audit_pool = db::connect_lazy(&config.common, u32::try_from(config.audit_writers.max(1) + 1).unwrap_or(4))?;
        audit::relay::spawn_relay(audit_pool.clone(), config.common.kafka.clone(), base_url.clone());
        let composites = Arc::new(fhir::composites(&config.common)?);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let kafka = Arc::new(kafka);
        let ops_addr = serve_ops(config, &pool, &audit_pool, &kafka, &metrics).await?;
        let state = AppState(Arc::new(Shared {
            auditor: Auditor::start(audit_pool, config.audit_writers, metrics.clone()),
            profiles: ProfileReads::start(
                (0..config.profile_readers.max(1)).map(|_| db::connect_for_batches(&config.common, 1)).collect::<db::Result<_>>()?,
                Duration::from_millis(config.profile_read_overlap_ms),
                config.profile_cache_mib << 20,
            ),
            pool,
            kafka,
            ready_timeout: Duration::from_millis(config.common.ready_timeout_ms),
            base_url,
            auth: Arc::new(auth),
            matcher,
            composites,
            subscription_limits: fhir::subscriptions::Limits {
                allow_http: config.subscription_allow_http,
                min_heartbeat_secs: config.subscription_min_heartbeat_secs,
            },
            subscription_max_per_partner: config.subscription_max_per_partner,
            egress: platform::egress::EgressPolicy::new(&config.subscription_allowed_networks).map_err(anyhow::Error::msg)?,
            limits_text: config.limits_text(),
            metrics,
        }));
        let (router, api) = router().split_for_parts();
        let request_limits = config.request_limits();
        let router = router
            .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
            .fallback(http::not_found)
            .method_not_allowed_fallback(http::method_not_allowed)
            // Inside the guard, so that what the limits refuse (and a panic) is audited too.
            .layer(axum::middleware::from_fn(move |request, next| crate::limits::enforce(request_limits, request, next)))
            .layer(axum::middleware::from_fn_with_state(state.clone(), crate::guard::guard))
            .layer(axum::middleware::from_fn_with_state(state.metrics.clone(), crate::metrics::track))
            .layer(axum::middleware::from_fn(crate::trace::context))
            .with_state(state);
        let listener = TcpListener::bind(config.http_bind).await?;
        Ok(Self { listener, router, limits: config.server_limits(), ops_addr })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Where the operations listener (health, readiness, metrics) answers.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ops_addr
    }

    /// Serves until ctrl-c / SIGTERM.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        crate::server::serve(self.listener, self.router, self.limits, platform::shutdown::signal()).await
    }
}

/// The operations listener: PostgreSQL (both pools) and Kafka for `/ready`; requests, matches,
/// the audit trail's lag and the pools' use for `/metrics`.
async fn serve_ops(
    config: &Config,
    pool: &db::Pool,
    audit_pool: &db::Pool,
    kafka: &Arc<BaseConsumer>,
    metrics: &Arc<crate::metrics::Metrics>,
) -> anyhow::Result<std::net::SocketAddr> {
    let mut ops = config.common.ops();
    metrics.register(ops.registry());
    db::observe(&mut ops, pool);
    let timeout = Duration::from_millis(config.common.ready_timeout_ms);
    let client = kafka.clone();
    ops.check("kafka", move || platform::ops::check_kafka(client.clone(), timeout));
    let (metrics, audit_pool) = (metrics.clone(), audit_pool.clone());
    ops.on_scrape(move || {
        let (metrics, pool) = (metrics.clone(), audit_pool.clone());
        async move { metrics.refresh(&pool).await }
    });
    // Until the process ends (the API's own server stops on a signal; the process then exits).
    ops.serve(config.common.ops_addr(platform::config::ops_port::API), Arc::new(std::sync::atomic::AtomicBool::new(false))).await
}
