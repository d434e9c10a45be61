//! Builds the application: so that `main` and every integration test start the same thing,
//! on a given (or random) port, against a given database and broker.

use crate::audit::{self, Auditor};
use crate::auth::{self, Auth, rate::Limit};
use crate::config::Config;
use crate::http;
use axum::Router;
use rdkafka::consumer::BaseConsumer;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

/// What every handler shares, behind one `Arc`: axum clones the state for each extractor that
/// takes it (twice per request), and cloning the fields themselves cost a dozen atomic
/// increments and a copy of `base_url` each time.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub pool: db::Pool,
    /// A metadata-only client for readiness checks (never joins a group, never fetches).
    pub kafka: Arc<BaseConsumer>,
    pub ready_timeout: Duration,
    /// Public base of the FHIR API, for fullUrls and links (no trailing slash).
    pub base_url: String,
    pub auth: Arc<Auth>,
    pub auditor: Auditor,
    /// Medication profile reads, grouped.
    pub profiles: http::profile::ProfileReads,
    /// PMM1 matching, when a pepper is configured.
    pub matcher: Option<Arc<http::matching::Matcher>>,
    /// The composites a partner's write-back updates (in the write's transaction).
    pub composites: Arc<Vec<Box<dyn fhir::composite::Composite>>>,
    /// What Subscriptions may ask for.
    pub subscription_limits: fhir::subscriptions::Limits,
    pub subscription_max_per_partner: i64,
    /// Which addresses rest-hook endpoints may have.
    pub egress: platform::egress::EgressPolicy,
    /// The limits a client meets, for the CapabilityStatement.
    pub limits_text: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "FHIR interoperability event platform", description = "FHIR R4B REST API over the composites the platform builds from the plan's systems of record. Besides the answers listed per operation, any request may get 408 (its headers, body or whole request took too long), 429 (its client address sent too many requests without a valid token), 500 (an unexpected failure, recorded) or 503 (a dependency is unavailable), each with an OperationOutcome; GET /fhir/metadata states the limits this deployment sets."),
    tags(
        (name = "operations", description = "Liveness and readiness"),
        (name = "conformance", description = "What this FHIR server supports"),
        (name = "Patient", description = "Members, and their composite medication profile"),
        (name = "MedicationStatement"), (name = "AllergyIntolerance"), (name = "Immunization"),
        (name = "Task", description = "Care gaps and next actions"),
        (name = "Provenance", description = "Who wrote each version of a partner's report"),
        (name = "Subscription", description = "Topic-based subscriptions (R4B + Subscriptions Backport) to medication-profile changes"),
        (name = "AuditEvent", description = "The audit trail, for operators (system/AuditEvent.read)"),
        (name = "authorization", description = "SMART Backend Services: discovery and the token endpoint")
    ),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

/// The bearer tokens of SMART Backend Services (client credentials with a signed assertion).
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ClientCredentials, Flow, OAuth2, Scopes, SecurityScheme};
        let scopes = Scopes::from_iter([
            ("system/*.read", "Read every clinical resource type of attributed members"),
            ("system/Patient.read", "Read Patients (and, with the other three types, $medication-profile)"),
            ("system/MedicationStatement.read", "Read MedicationStatements"),
            ("system/AllergyIntolerance.read", "Read AllergyIntolerances"),
            ("system/Immunization.read", "Read Immunizations"),
            ("system/Task.read", "Read Tasks"),
            ("system/Provenance.read", "Read the Provenance of partners' reports"),
            ("system/MedicationStatement.write", "Report and update MedicationStatements for attributed members (write-back)"),
            ("system/AllergyIntolerance.write", "Report and update AllergyIntolerances for attributed members (write-back)"),
            ("system/Subscription.write", "Create and delete the partner's Subscriptions (read with system/Subscription.read)"),
            ("system/AuditEvent.read", "Operators: read the audit trail (never granted by a wildcard)"),
        ]);
        let flow = Flow::ClientCredentials(ClientCredentials::new(auth::token::PATH, scopes));
        let mut scheme = OAuth2::with_description(
            [flow],
            "SMART Backend Services: POST /auth/token with grant_type=client_credentials and a private_key_jwt client assertion (RS384 or ES384); send the token as 'Authorization: Bearer <token>'.",
        );
        scheme.extensions = None;
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("smart_backend", SecurityScheme::OAuth2(scheme));
    }
}

fn router() -> OpenApiRouter<AppState> {
    use http::resources::{allergy_intolerance, immunization, medication_statement, patient, provenance, task};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(http::health::health))
        .routes(routes!(http::health::ready))
        .routes(routes!(http::health::metrics))
        .routes(routes!(auth::token::smart_configuration_handler))
        .routes(routes!(auth::token::smart_configuration_fhir))
        .routes(routes!(auth::token::token))
        .routes(routes!(http::audit_events::search))
        .routes(routes!(http::audit_events::read))
        .routes(routes!(http::metadata::metadata))
        .routes(routes!(http::profile::medication_profile))
        .routes(routes!(http::matching::hashed_match))
        .routes(routes!(patient::read))
        .routes(routes!(patient::vread))
        .routes(routes!(patient::history))
        .routes(routes!(patient::search))
        .routes(routes!(medication_statement::read))
        .routes(routes!(medication_statement::vread))
        .routes(routes!(medication_statement::history))
        .routes(routes!(medication_statement::search))
        .routes(routes!(allergy_intolerance::read))
        .routes(routes!(allergy_intolerance::vread))
        .routes(routes!(allergy_intolerance::history))
        .routes(routes!(allergy_intolerance::search))
        .routes(routes!(immunization::read))
        .routes(routes!(immunization::vread))
        .routes(routes!(immunization::history))
        .routes(routes!(immunization::search))
        .routes(routes!(task::read))
        .routes(routes!(task::vread))
        .routes(routes!(task::history))
        .routes(routes!(task::search))
        .routes(routes!(provenance::read))
        .routes(routes!(provenance::vread))
        .routes(routes!(provenance::history))
        .routes(routes!(provenance::search))
        .routes(routes!(http::writeback::medication_statement::create))
        .routes(routes!(http::writeback::medication_statement::update))
        .routes(routes!(http::writeback::allergy_intolerance::create))
        .routes(routes!(http::writeback::allergy_intolerance::update))
        .routes(routes!(http::subscriptions::topics))
        .routes(routes!(http::subscriptions::topic))
        .routes(routes!(http::subscriptions::create))
        .routes(routes!(http::subscriptions::search))
        .routes(routes!(http::subscriptions::read))
        .routes(routes!(http::subscriptions::delete))
        .routes(routes!(http::subscriptions::status))
        .routes(routes!(http::subscriptions::events))
}

/// Anything not routed: an unknown resource type or path.
async fn not_found(uri: axum::http::Uri) -> crate::error::ApiError {
    let path = uri.path();
    let what = match path.strip_prefix("/fhir/").and_then(|p| p.split('/').next()) {
        Some(t) if !t.is_empty() && crate::rest::ResourceType::ALL.iter().all(|rt| rt.name() != t) && !t.starts_with('$') => {
            format!("resource type '{t}' is not supported; see /fhir/metadata")
        }
        _ => "no such path; see /fhir/metadata and /openapi.json".to_owned(),
    };
    crate::error::ApiError::NotFound(what)
}

async fn method_not_allowed(method: axum::http::Method) -> crate::error::ApiError {
    crate::error::ApiError::MethodNotAllowed(format!("{method} is not supported here; see /fhir/metadata"))
}

/// The OpenAPI document generated from the handlers (committed at `openapi/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().split_for_parts().1
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    limits: crate::server::ServerLimits,
}

impl Application {
    /// Connects to PostgreSQL (running migrations when `migrate` is set), prepares the Kafka
    /// client and binds the listener. Fails if PostgreSQL cannot be reached at start.
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        config.common.check_limits().map_err(anyhow::Error::msg)?;
        let pool = db::connect_configured(&config.common, config.common.database_max_connections).await?;
        db::migrate(&pool).await?;
        Self::build_with_pool(config, pool).await
    }

    /// As `build`, with an existing pool (which may point at a database that is down).
    pub async fn build_with_pool(config: &Config, pool: db::Pool) -> anyhow::Result<Self> {
        let kafka: BaseConsumer = platform::kafka::client(&config.common.kafka.bootstrap_servers)
            .set("client.id", "fhir-api-ready")
            .set("socket.timeout.ms", "3000")
            .set("log_level", "3")
            .create()?;
        let base_url = config.common.fhir_base_url.trim_end_matches('/').to_owned();
        let auth = Auth {
            token_url: config.token_url(),
            token_lifetime: Duration::from_secs(config.auth_token_lifetime_secs),
            default_limit: Limit { rate: config.rate_limit_per_second, burst: f64::from(config.rate_limit_burst) },
            limiter: Default::default(),
            address_limit: Limit { rate: config.address_rate_limit_per_second, burst: f64::from(config.address_rate_limit_burst) },
            address_limiter: Default::default(),
            grants: Default::default(),
        };
        auth.grants.follow(pool.clone());
        let matcher = config.pmm1.pepper().map_err(anyhow::Error::msg)?.map(|pepper| {
            let limit = Limit { rate: config.match_rate_limit_per_second, burst: f64::from(config.match_rate_limit_burst) };
            Arc::new(http::matching::Matcher::new(pepper.bytes(), Duration::from_millis(config.match_latency_floor_ms), limit))
        });
        // The audit trail has connections of its own: requests that hold the request pool's
        // connections (or wait for them) cannot keep accesses from being recorded.
        let audit_pool = db::connect_lazy(&config.common, u32::try_from(config.audit_writers.max(1) + 1).unwrap_or(4))?;
        audit::spawn_relay(audit_pool.clone(), config.common.kafka.clone(), base_url.clone());
        let composites: Arc<Vec<Box<dyn fhir::composite::Composite>>> = Arc::new(fhir::composites(&config.common));
        let state = AppState(Arc::new(Shared {
            auditor: Auditor::start(audit_pool, config.audit_writers),
            profiles: http::profile::ProfileReads::start(
                (0..config.profile_readers.max(1)).map(|_| db::connect_for_batches(&config.common, 1)).collect::<db::Result<_>>()?,
                Duration::from_millis(config.profile_read_overlap_ms),
                config.profile_cache_mib << 20,
            ),
            pool,
            kafka: Arc::new(kafka),
            ready_timeout: Duration::from_millis(config.ready_timeout_ms),
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
        }));
        let (router, api) = router().split_for_parts();
        let request_limits = config.request_limits();
        let router = router
            .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // Inside the guard, so that what the limits refuse (and a panic) is audited too.
            .layer(axum::middleware::from_fn(move |request, next| crate::limits::enforce(request_limits, request, next)))
            .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
            .with_state(state);
        let listener = TcpListener::bind(config.http_bind).await?;
        Ok(Self { listener, router, limits: config.server_limits() })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until ctrl-c / SIGTERM.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        crate::server::serve(self.listener, self.router, self.limits, platform::shutdown::signal()).await
    }
}
