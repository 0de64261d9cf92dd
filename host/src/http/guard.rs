//! Layers around every route: the wall-clock request timeout, a panic in a handler answered
//! as a 500, and the guarantee that every error answer is `{"error": "..."}` — including
//! those axum writes itself (404 for an unknown path, 405 for a known path with the wrong
//! method, extractor rejections), which come with an empty or plain-text body.
//!
//! The request timeout covers the answer's body too: a stream (`/v1/infer` SSE, the OpenAI
//! routes' streams) ends at the deadline with a last `data: {"error": ...}` event, and the
//! body is dropped, which cancels the request's work and gives its admission place back. A
//! client that stops reading is cut by the server's write timeout (`server`), which is
//! never longer than the request timeout.

use std::any::Any;
use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;
use http_body::Body as _;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;

use super::error::ApiError;

/// Largest body of an error answer that is rewritten as JSON; larger ones are not read.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Wraps every route (and the fallback) of `router` in the layers. Call it last: routes
/// added after it are not covered.
///
/// The layers wrap the routed `router` as a whole rather than each of its routes: axum adds
/// a 405's `Allow` header as the route's answer leaves the router that matched it, after any
/// layer on that route has run, and `json_errors` names the allowed methods from it.
pub(super) fn apply(router: Router, request_timeout: Duration) -> Router {
    Router::new()
        .fallback_service(router)
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            request_timeout,
            within_timeout,
        ))
}

/// The wall-clock bound: the answer's head must be ready within `timeout`, or the handler is
/// dropped (which cancels its work) and the client gets 504; a body still streaming at the
/// deadline is ended there.
async fn within_timeout(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    let deadline = Instant::now() + timeout;
    match tokio::time::timeout_at(deadline, next.run(request)).await {
        Ok(response) if response.body().size_hint().exact().is_some() => response,
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let sse = is_content_type(&parts.headers, "text/event-stream");
            let body = until_deadline(body, deadline, sse, timeout);
            Response::from_parts(parts, body)
        }
        Err(_) => past_timeout(timeout).into_response(),
    }
}

/// `body` up to `deadline`; there it is dropped, and a stream of Server-Sent Events gets a
/// last `data: {"error": ...}` event (another body is cut: its client sees a broken answer,
/// not a complete one).
fn until_deadline(body: Body, deadline: Instant, sse: bool, timeout: Duration) -> Body {
    let sleep = Box::pin(tokio::time::sleep_until(deadline));
    let chunks = futures::stream::unfold(
        Some((body.into_data_stream(), sleep)),
        move |state| async move {
            let (mut data, mut sleep) = state?;
            tokio::select! {
                biased;
                chunk = data.next() => chunk.map(|chunk| (chunk, Some((data, sleep)))),
                () = &mut sleep => {
                    drop(data);
                    tracing::warn!("a streamed answer ran past the request timeout: ended");
                    let last = match sse {
                        true => {
                            let error = serde_json::json!({ "error": past_timeout(timeout).message });
                            Ok(Bytes::from(format!("data: {error}\n\n")))
                        }
                        false => Err(axum::Error::new("the request timeout ended the answer")),
                    };
                    Some((last, None))
                }
            }
        },
    );
    Body::from_stream(chunks)
}

/// The answer to a request that ran past `timeout`.
pub(super) fn past_timeout(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the request took longer than the worker's request timeout ({})",
            humantime::format_duration(timeout)
        ),
    )
}

/// Rewrites an error answer that is not JSON as `{"error": ...}`, keeping its status and its
/// headers (`Allow` on a 405, `WWW-Authenticate` on a 401).
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    if !is_error || is_content_type(response.headers(), "application/json") {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let message = match status {
        _ if !text.is_empty() => text,
        StatusCode::NOT_FOUND => format!("no route for {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => match parts
            .headers
            .get(header::ALLOW)
            .and_then(|allow| allow.to_str().ok())
        {
            Some(allowed) => format!("{method} is not allowed on {path} (allowed: {allowed})"),
            None => format!("{method} is not allowed on {path}"),
        },
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let json = ApiError::new(status, message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, json.into_body())
}

fn is_content_type(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with(expected))
}

/// A handler that panicked: logged with its message, answered 500 without it (a panic
/// message is for the operator, not for whoever sent the request).
fn panicked(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!("a request handler panicked: {message}");
    ApiError::internal("internal error: the request's handler failed").into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::{get, post};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    fn app(timeout: Duration) -> Router {
        let routes = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/panic",
                get(|| async {
                    if true {
                        panic!("boom");
                    }
                    "unreachable"
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "late"
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    let events = futures::stream::iter(["data: 1\n\n"])
                        .chain(futures::stream::pending())
                        .map(Ok::<_, std::convert::Infallible>);
                    (
                        [(header::CONTENT_TYPE, "text/event-stream")],
                        Body::from_stream(events),
                    )
                }),
            )
            .route(
                "/json",
                post(|axum::Json(value): axum::Json<Value>| async move { value.to_string() }),
            )
            // As the real POST routes are: a body limit on the route.
            .route(
                "/limited",
                post(|body: String| async move { body })
                    .layer(axum::extract::DefaultBodyLimit::max(16)),
            );
        apply(routes, timeout)
    }

    async fn call(
        app: Router,
        method: &str,
        path: &str,
        body: &'static str,
    ) -> (StatusCode, Option<String>, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let allow = response
            .headers()
            .get(header::ALLOW)
            .map(|allow| allow.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, allow, json)
    }

    #[tokio::test]
    async fn axum_errors_become_json() {
        let app = app(Duration::from_secs(5));
        let (status, _, body) = call(app.clone(), "GET", "/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no route for GET /nope");

        let (status, allow, body) = call(app.clone(), "DELETE", "/ok", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allow.as_deref(), Some("GET,HEAD"));
        assert!(body["error"].as_str().unwrap().contains("DELETE"), "{body}");

        let (status, allow, body) = call(app.clone(), "GET", "/limited", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allow.as_deref(), Some("POST"));
        assert_eq!(
            body["error"], "GET is not allowed on /limited (allowed: POST)",
            "{body}"
        );
        // The limit still holds.
        let (status, _, _) = call(app.clone(), "POST", "/limited", "seventeen bytes!!").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        // An extractor's own rejection (axum's Json), plain text before.
        let (status, _, body) = call(app.clone(), "POST", "/json", "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].is_string(), "{body}");

        let (status, _, _) = call(app, "GET", "/ok", "").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_json_500() {
        let (status, _, body) = call(app(Duration::from_secs(5)), "GET", "/panic", "").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body["error"].as_str().unwrap().contains("internal error"));
    }

    #[tokio::test]
    async fn a_stream_past_the_timeout_ends_with_an_error_event() {
        let started = std::time::Instant::now();
        let request = Request::get("/stream").body(Body::empty()).unwrap();
        let response = app(Duration::from_millis(300))
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(text.starts_with("data: 1\n\n"), "{text:?}");
        assert!(text.contains(r#"data: {"error":"#), "{text:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_request_past_the_timeout_is_a_json_504() {
        let started = std::time::Instant::now();
        let (status, _, body) = call(app(Duration::from_millis(300)), "GET", "/slow", "").await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(body["error"].as_str().unwrap().contains("300ms"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
