//! Per-request limits, enforced before a handler does any work: how large a body each route
//! takes and how long it may take to arrive, how long a whole request may take, and a panic
//! in a handler answered as a 500 `OperationOutcome` (the process goes on serving). The
//! per-connection limits are in `crate::server`.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

/// The body of the token request and of `$hashed-match` (a form, or five tokens): far smaller
/// than any resource.
pub const SMALL_BODY_BYTES: usize = 16 * 1024;

/// The API's request limits.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest resource a partner may send (write-back, Subscription).
    pub resource_body_bytes: usize,
    /// How long a body may take to arrive, once the headers have.
    pub body_timeout: Duration,
    /// How long a whole request may take, from its headers to its response.
    pub request_timeout: Duration,
}

/// The largest body a route takes, as a request extension (set by [`enforce`]).
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    bytes: usize,
    timeout: Duration,
}

/// Routes that take a resource as their body.
fn takes_resource(method: &Method, route: &str) -> bool {
    matches!(
        (method, route),
        (&Method::POST, "/fhir/MedicationStatement" | "/fhir/AllergyIntolerance" | "/fhir/Subscription")
            | (&Method::PUT, "/fhir/MedicationStatement/{id}" | "/fhir/AllergyIntolerance/{id}")
    )
}

/// The largest body `method` on `route` (a route template) takes.
pub fn body_limit(limits: &RequestLimits, method: &Method, route: &str) -> usize {
    if takes_resource(method, route) { limits.resource_body_bytes } else { SMALL_BODY_BYTES }
}

/// In front of every handler: a body announced larger than the route takes is refused before
/// it is read; the route's limit goes to [`RequestBody`]; the request gets `request_timeout`
/// to finish; a panic becomes a 500.
pub async fn enforce(limits: RequestLimits, mut request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_default();
    let path = request.uri().path().to_owned();
    let bytes = body_limit(&limits, request.method(), &route);
    let announced = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > bytes as u64) {
        drain(request.into_body().into_data_stream(), limits.body_timeout).await;
        return ApiError::PayloadTooLarge { limit: bytes }.respond_on(&path);
    }
    request.extensions_mut().insert(BodyLimit { bytes, timeout: limits.body_timeout });
    let method = request.method().clone();
    match tokio::time::timeout(limits.request_timeout, AssertUnwindSafe(next.run(request)).catch_unwind()).await {
        Ok(Ok(response)) => response,
        Ok(Err(_panic)) => {
            // The panic's message can quote input: only the route is logged.
            tracing::error!(%method, route = %route, "a handler panicked; answered 500");
            ApiError::Internal.respond_on(&path)
        }
        Err(_) => {
            tracing::warn!(%method, route = %route, timeout_ms = limits.request_timeout.as_millis() as u64, "request timed out");
            ApiError::RequestTimeout(format!("the request took longer than {} s; retry later", limits.request_timeout.as_secs_f64()))
                .respond_on(&path)
        }
    }
}

/// Most of a refused body read (and dropped) before the answer: a connection closed with
/// unread data is reset, and the reset can destroy the answer before the client reads it.
const DRAIN_BYTES: usize = 2 * 1024 * 1024;

/// Reads and drops up to [`DRAIN_BYTES`] of a body, for at most `wait`.
async fn drain(mut stream: axum::body::BodyDataStream, wait: Duration) {
    let mut read = 0;
    let _ = tokio::time::timeout(wait.min(Duration::from_secs(2)), async {
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
            read += chunk.len();
            if read >= DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// A request body read within its route's limit and time (413 or 408 `OperationOutcome`
/// otherwise), for handlers that take one instead of axum's `Bytes`.
#[derive(Debug)]
pub struct RequestBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let limit =
            request.extensions().get::<BodyLimit>().copied().unwrap_or(BodyLimit { bytes: SMALL_BODY_BYTES, timeout: Duration::from_secs(10) });
        let mut stream = request.into_body().into_data_stream();
        let mut body = bytes::BytesMut::new();
        let read = tokio::time::timeout(limit.timeout, async {
            while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
                body.extend_from_slice(&chunk?);
                if body.len() > limit.bytes {
                    return Ok(false);
                }
            }
            Ok::<_, axum::Error>(true)
        })
        .await;
        match read {
            Ok(Ok(true)) => Ok(RequestBody(body.freeze())),
            Ok(Ok(false)) => {
                drain(stream, limit.timeout).await;
                Err(ApiError::PayloadTooLarge { limit: limit.bytes })
            }
            Ok(Err(_)) => Err(ApiError::BadRequest("the request body could not be read".into())),
            Err(_) => Err(ApiError::RequestTimeout(format!("the request body did not arrive within {} s", limit.timeout.as_secs_f64()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn limits() -> RequestLimits {
        RequestLimits { resource_body_bytes: 1024, body_timeout: Duration::from_millis(200), request_timeout: Duration::from_millis(300) }
    }

    async fn call(request: axum::http::Request<axum::body::Body>) -> (u16, serde_json::Value) {
        let app = Router::new()
            .route(
                "/panics",
                get(|| async {
                    if true {
                        panic!("boom: member M1")
                    }
                }),
            )
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(5)).await }))
            .route("/fhir/Subscription", post(|RequestBody(body): RequestBody| async move { body.len().to_string() }))
            .layer(axum::middleware::from_fn(|r, n| enforce(limits(), r, n)));
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn get_(uri: &str) -> axum::http::Request<axum::body::Body> {
        axum::http::Request::get(uri).body(axum::body::Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_panic_is_a_500_outcome_and_a_slow_request_a_408() {
        let (status, body) = call(get_("/panics")).await;
        assert_eq!((status, body["resourceType"].as_str(), body["issue"][0]["code"].as_str()), (500, Some("OperationOutcome"), Some("exception")));
        assert!(!body.to_string().contains("M1"), "the panic's message is not sent");
        let (status, body) = call(get_("/slow")).await;
        assert_eq!((status, body["issue"][0]["code"].as_str()), (408, Some("timeout")));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_whether_announced_or_not() {
        let post = |body: axum::body::Body, length: Option<usize>| {
            let mut r = axum::http::Request::post("/fhir/Subscription");
            if let Some(n) = length {
                r = r.header(header::CONTENT_LENGTH, n);
            }
            r.body(body).unwrap()
        };
        assert_eq!(call(post(axum::body::Body::from(vec![b'x'; 1024]), Some(1024))).await.0, 200);
        let (status, body) = call(post(axum::body::Body::from(vec![b'x'; 1025]), Some(1025))).await;
        assert_eq!((status, body["issue"][0]["code"].as_str()), (413, Some("too-long")));
        // Streamed without a length: counted as it arrives.
        let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 200])));
        assert_eq!(call(post(axum::body::Body::from_stream(chunks), None)).await.0, 413);
        // A body that stops arriving.
        let stalled = futures::StreamExt::chain(futures::stream::iter([Ok::<_, std::io::Error>(vec![b'x'; 10])]), futures::stream::pending());
        assert_eq!(call(post(axum::body::Body::from_stream(stalled), None)).await.0, 408);
    }

    #[test]
    fn resources_get_the_configured_limit_and_everything_else_a_small_one() {
        let limits = RequestLimits { resource_body_bytes: 65_536, body_timeout: Duration::from_secs(1), request_timeout: Duration::from_secs(1) };
        assert_eq!(body_limit(&limits, &Method::POST, "/fhir/MedicationStatement"), 65_536);
        assert_eq!(body_limit(&limits, &Method::PUT, "/fhir/AllergyIntolerance/{id}"), 65_536);
        assert_eq!(body_limit(&limits, &Method::POST, "/fhir/Subscription"), 65_536);
        assert_eq!(body_limit(&limits, &Method::POST, "/auth/token"), SMALL_BODY_BYTES);
        assert_eq!(body_limit(&limits, &Method::POST, "/fhir/Patient/$hashed-match"), SMALL_BODY_BYTES);
        assert_eq!(body_limit(&limits, &Method::GET, "/fhir/MedicationStatement"), SMALL_BODY_BYTES);
    }
}
