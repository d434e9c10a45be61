//! Trace context of API requests (`platform::trace`): a request's `traceparent` (a new trace
//! when it has none or an invalid one) becomes the API's own span, a child of it. The span's
//! trace id is on every log line written while the request is served (`trace_id`), and the
//! request's `traceparent` header is replaced by the API's span, so that what the request
//! writes (a write-back's composite versions and `partner.inbound.v1` message) carries it on.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use platform::trace::{HEADER, TraceParent};
use tracing::Instrument;

pub async fn context(mut request: Request, next: Next) -> Response {
    let incoming = request.headers().get(HEADER).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let span = incoming.map_or_else(TraceParent::root, |t| t.child());
    if let Ok(value) = axum::http::HeaderValue::from_str(&span.to_string()) {
        request.headers_mut().insert(HEADER, value);
    }
    next.run(request).instrument(tracing::info_span!("request", trace_id = %span.trace_id())).await
}

/// The API's span of a request, as [`context`] left it in the request's headers.
pub fn of(headers: &axum::http::HeaderMap) -> Option<TraceParent> {
    headers.get(HEADER).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse)
}
