//! What every handler shares (`AppState`), behind one `Arc`. Handlers and middleware take it;
//! it depends on none of them.

use crate::audit::writer::Auditor;
use crate::auth::Auth;
use crate::matcher::Matcher;
use crate::profile_reads::ProfileReads;
use rdkafka::consumer::BaseConsumer;
use std::sync::Arc;
use std::time::Duration;

/// What every handler shares, behind one `Arc`: axum clones the state for each extractor that
/// takes it (twice per request), and cloning the fields themselves cost a dozen atomic
/// increments and a copy of `base_url` each time.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Shared>);

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
    pub profiles: ProfileReads,
    /// PMM1 matching, when a pepper is configured.
    pub matcher: Option<Arc<Matcher>>,
    /// The composites a partner's write-back updates (in the write's transaction).
    pub composites: Arc<fhir::composite::Composites>,
    /// What Subscriptions may ask for.
    pub subscription_limits: fhir::subscriptions::Limits,
    pub subscription_max_per_partner: i64,
    /// Which addresses rest-hook endpoints may have.
    pub egress: platform::egress::EgressPolicy,
    /// The limits a client meets, for the CapabilityStatement.
    pub limits_text: String,
    /// What the operations listener exports.
    pub metrics: Arc<crate::metrics::Metrics>,
}
