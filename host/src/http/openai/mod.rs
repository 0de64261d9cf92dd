//! The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, as the OpenAI SDKs, Open WebUI and LangChain call them.
//!
//! The host owns the wire format: parsing and checking bodies (`wire`), the response and
//! chunk shapes, ids and usage (`reply`), errors in OpenAI's shape (`error`) and the optional
//! `--api-key`. The guest's `openai` export owns the policy: how messages become a prompt
//! (the model's chat template), defaults and stop rules; its `openai-agents` export, where it
//! has one, also what agent clients' fields (`agent`: structured output, log-probabilities;
//! `tools`: tool calling) mean. A guest without either keeps serving `/v1/infer`; these routes then answer 501
//! naming it.

mod agent;
mod error;
mod reply;
mod tools;
mod wire;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rbee_engine::Engine;

pub use error::OpenAiError;
use reply::{Answer, Route};
use wire::Envelope;

use super::work::{self, GuestJob, InFlight};
use super::{AppState, Bearer};
use crate::guest::{AgentAnswer, OpenAiCall, OpenAiRequest, chat_channel, client_channel};
use crate::http::ReadyModel;

/// The OpenAI routes, behind the API key when one is set.
pub(super) fn routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let body_limit = DefaultBodyLimit::max(state.max_body_bytes);
    let router = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions).layer(body_limit))
        .route("/v1/chat/completions", post(chat).layer(body_limit));
    match &state.api_key {
        Some(key) => router.route_layer(middleware::from_fn_with_state(
            Arc::<str>::from(key.as_str()),
            require_api_key,
        )),
        None => router,
    }
}

/// The bearer check, as llama-server and vLLM do it: 401 unless the key matches.
async fn require_api_key(
    State(key): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Result<Response, OpenAiError> {
    authorize(&key, request.headers())?;
    Ok(next.run(request).await)
}

fn authorize(key: &str, headers: &HeaderMap) -> Result<(), OpenAiError> {
    let message = match super::bearer(headers, key) {
        Bearer::Right => return Ok(()),
        Bearer::Wrong => "incorrect API key",
        Bearer::Missing => "this server needs an API key: `Authorization: Bearer <key>`",
    };
    Err(OpenAiError::new(StatusCode::UNAUTHORIZED, message).with_code("invalid_api_key"))
}

/// `GET /v1/models`: the one model this worker serves.
async fn models(State(app): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": app.served_model,
            "object": "model",
            "created": app.started_at,
            "owned_by": "rbee",
        }],
    }))
    .into_response()
}

/// The model, for a route that generates: 503 in OpenAI's shape while it loads.
struct Model(Arc<Engine>);

impl FromRequestParts<Arc<AppState>> for Model {
    type Rejection = OpenAiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let ReadyModel(model) = ReadyModel::from_request_parts(parts, app).await?;
        Ok(Self(model))
    }
}

async fn completions(
    State(app): State<Arc<AppState>>,
    Model(model): Model,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let (envelope, request) = wire::completion(&body)?;
    serve(&app, model, envelope, Route::Completion, request).await
}

async fn chat(
    State(app): State<Arc<AppState>>,
    Model(model): Model,
    body: Bytes,
) -> Result<Response, OpenAiError> {
    let (envelope, request) = wire::chat(&body)?;
    serve(&app, model, envelope, Route::Chat, request).await
}

/// Runs one request on the guest and answers it as JSON or as a stream of chunks.
async fn serve(
    app: &AppState,
    model: Arc<Engine>,
    envelope: Envelope,
    route: Route,
    request: OpenAiRequest,
) -> Result<Response, OpenAiError> {
    if let Some(named) = &envelope.model
        && named != &app.served_model
    {
        return Err(OpenAiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..OpenAiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{named}` does not exist; this worker serves `{}`",
                    app.served_model
                ),
            )
        });
    }
    // A guest of the OpenAI routes without their agent export cannot honour these fields:
    // refused by name, as a field this server does not serve. (A guest swapped in between
    // is refused the same way by the runtime, without the field's `param`.)
    let active = app.guests.status().active;
    if active.openai
        && !active.openai_agents
        && let Some(field) = request.first_agent_field()
    {
        return Err(OpenAiError::unsupported(
            field,
            &format!(
                "the active guest, `{}`, does not serve it (it does not export \
                 rbee:worker/openai-agents)",
                active.name
            ),
        ));
    }
    agent::check_against(&model, &request.agent)?;
    if let OpenAiCall::Chat(chat) = &request.call {
        tools::check_against(&model, &chat.tools)?;
    }
    let answer = Answer::new(
        route,
        app.served_model.clone(),
        request.agent.logprobs.is_some(),
    );
    // Each choice (`n`) is a guest call and a sequence of its own, admitted like a request;
    // the choices run together, in one batch. A choice starts as soon as it is admitted, so
    // more choices than admission slots wait for earlier ones instead of for each other.
    if !envelope.stream {
        let mut jobs = Vec::new();
        let mut in_flight = Vec::new();
        for index in 0..envelope.choices {
            let lease = work::admit(app).await?;
            let (job, held) = start(app, model.clone(), request.for_choice(index), None, lease);
            jobs.push(work::finish(job));
            in_flight.push(held);
        }
        let answers = futures::future::join_all(jobs)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        drop(in_flight);
        return Ok(axum::Json(answer.whole(answers)).into_response());
    }
    let mut started = Vec::new();
    for index in 0..envelope.choices {
        let lease = work::admit(app).await?;
        let (client, pieces) = match route {
            Route::Chat => chat_channel(),
            Route::Completion => client_channel(),
        };
        let (job, in_flight) = start(
            app,
            model.clone(),
            request.for_choice(index),
            Some(client),
            lease,
        );
        started.push((pieces, job, in_flight));
    }
    // As on /v1/infer: each choice's first piece is awaited so that a guest failing before
    // it says anything gets an HTTP error rather than a stream that only holds one.
    let mut choices = Vec::new();
    for (mut pieces, job, in_flight) in started {
        let first = pieces.recv().await;
        let end = match first {
            Some(_) => reply::End::Running(job),
            None => reply::End::Done(work::finish(job).await?),
        };
        choices.push(reply::StreamedChoice {
            first,
            pieces,
            end,
            in_flight,
        });
    }
    Ok(answer.stream(choices, envelope.include_usage))
}

fn start(
    app: &AppState,
    model: Arc<Engine>,
    request: OpenAiRequest,
    client: Option<crate::guest::ClientSender>,
    lease: work::Lease,
) -> (GuestJob<AgentAnswer>, InFlight) {
    work::start_guest(app, model, client, lease, move |runtime, guest, context| {
        runtime.openai(guest, request, context)
    })
}
