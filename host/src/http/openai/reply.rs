//! The OpenAI answers: whole responses, and streams of chunks as the SDKs parse them.
//!
//! A stream has one id throughout. Each choice (`n` of them, by `index`) has its chunks: a
//! chat's first carries `role: "assistant"`; then one chunk per piece of text; then exactly
//! one chunk with the `finish_reason`. The choices' chunks interleave as they are produced.
//! With `stream_options.include_usage`, one more chunk with `choices: []` and the usage of all
//! choices (and `usage: null` on the others, as OpenAI sends them); then `data: [DONE]`. A
//! choice that fails after the stream began ends with an `{"error": {...}}` event instead of
//! its finish chunk.
//!
//! Log-probabilities, when asked for, go in each choice's and chunk's `logprobs`, in the
//! route's own shape: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`, the
//! legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.
//!
//! A chat answer's tool calls go in `message.tool_calls`, or, streamed, one
//! `delta.tool_calls` chunk per call (numbered by `index`, whole arguments in one piece, as
//! the SDKs assemble them); with calls the finish reason is `tool_calls` (unless
//! `max_tokens` cut the answer: `length`). The host gives
//! each call its id.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, stream};
use serde_json::{Value, json};

use super::error::OpenAiError;
use crate::guest::{
    AgentAnswer, ClientReceiver, Emitted, FinishReason, Generation, TokenLogprob, ToolCall,
};
use crate::http::work::{self, GuestJob, InFlight};

/// Which route answers: they differ in object names and in where the text goes.
#[derive(Clone, Copy)]
pub enum Route {
    Completion,
    Chat,
}

/// The parts every response and chunk of one request share.
pub struct Answer {
    route: Route,
    id: String,
    created: u64,
    model: String,
    /// Whether the client asked for log-probabilities (else `logprobs: null`).
    logprobs: bool,
}

/// How one choice's stream ends: with the guest still running, or already answered (it
/// emitted nothing).
pub enum End {
    Running(GuestJob<AgentAnswer>),
    Done(AgentAnswer),
}

/// One choice of a streamed request: the piece already received, the rest, how it ends, and
/// the hold on its work (dropping it cancels the work).
pub struct StreamedChoice {
    pub first: Option<Emitted>,
    pub pieces: ClientReceiver,
    pub end: End,
    pub in_flight: InFlight,
}

/// What the choices of a stream generated, for the usage chunk once all have ended.
#[derive(Default)]
struct Totals {
    prompt_tokens: Option<u32>,
    completion_tokens: u32,
}

impl Answer {
    pub fn new(route: Route, model: String, logprobs: bool) -> Self {
        let prefix = match route {
            Route::Completion => "cmpl",
            Route::Chat => "chatcmpl",
        };
        Self {
            route,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            model,
            logprobs,
        }
    }

    /// The JSON response of a request that was not streamed, with one choice per answer.
    /// The usage counts the prompt once and every choice's tokens.
    pub fn whole(&self, answers: Vec<AgentAnswer>) -> Value {
        let prompt_tokens = answers
            .first()
            .map_or(0, |answer| answer.generation.completion.prompt_tokens);
        let completion_tokens = answers
            .iter()
            .map(|answer| answer.generation.completion.tokens_generated)
            .sum();
        let choices: Vec<Value> = answers
            .into_iter()
            .enumerate()
            .map(|(index, answer)| self.whole_choice(index, answer))
            .collect();
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        })
    }

    fn whole_choice(&self, index: usize, answer: AgentAnswer) -> Value {
        let AgentAnswer {
            generation:
                Generation {
                    completion,
                    logprobs,
                },
            tool_calls,
        } = answer;
        let finish_reason = finish_reason(completion.finish_reason, &tool_calls);
        let logprobs = self.logprobs_json(&logprobs, 0);
        match self.route {
            Route::Completion => json!({
                "index": index,
                "text": completion.text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Route::Chat => {
                let mut message =
                    json!({ "role": "assistant", "content": completion.text, "refusal": null });
                if !tool_calls.is_empty() {
                    let calls: Vec<Value> = tool_calls.iter().map(tool_call_json).collect();
                    message["tool_calls"] = json!(calls);
                    // OpenAI's shape: a turn of calls alone has no content.
                    if completion.text.trim().is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                })
            }
        }
    }

    /// The event stream of a streamed request: each choice's chunks as they come, the
    /// choices interleaved, each ending with its finish chunk (or an error event); then the
    /// usage chunk when asked for, and `[DONE]`. The stream owns the choices' holds on their
    /// work, so a client that goes away cancels it all.
    pub fn stream(self, choices: Vec<StreamedChoice>, include_usage: bool) -> Response {
        let this = Arc::new(self);
        let totals = Arc::new(Mutex::new(Totals::default()));
        let choices: Vec<_> = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| {
                this.clone()
                    .choice_events(index, choice, include_usage, totals.clone())
                    .boxed()
            })
            .collect();
        let ending = stream::once(async move {
            let mut events = Vec::new();
            if include_usage {
                let totals = lock(&totals);
                let prompt_tokens = totals.prompt_tokens.unwrap_or(0);
                events.push(this.event(json!([]), usage(prompt_tokens, totals.completion_tokens)));
            }
            events.push(Event::default().data("[DONE]"));
            events
        })
        .flat_map(stream::iter);
        let events = stream::select_all(choices)
            .chain(ending)
            .map(Ok::<_, Infallible>);
        Sse::new(events).into_response()
    }

    /// One choice's events: the chat's opening `role` chunk, its pieces, its end.
    fn choice_events(
        self: Arc<Self>,
        index: usize,
        choice: StreamedChoice,
        include_usage: bool,
        totals: Arc<Mutex<Totals>>,
    ) -> impl futures::Stream<Item = Event> {
        let StreamedChoice {
            first,
            pieces,
            end,
            in_flight,
        } = choice;
        let opening = match self.route {
            Route::Chat => Some(self.chunk(
                index,
                json!({ "role": "assistant", "content": "" }),
                Value::Null,
                None,
                include_usage,
            )),
            Route::Completion => None,
        };
        let texts = {
            let this = self.clone();
            // The completions shape counts each token's offset in the whole text; tool calls
            // are numbered in order.
            stream::iter(first)
                .chain(pieces)
                .scan((0, 0), move |(offset, calls), piece| {
                    let chunk = match &piece.tool_call {
                        Some(call) => {
                            *calls += 1;
                            this.tool_call_chunk(index, call, *calls - 1, include_usage)
                        }
                        None => this.text_chunk(index, &piece, *offset, include_usage),
                    };
                    *offset += piece.text.len();
                    std::future::ready(Some(chunk))
                })
        };
        let closing = stream::once(async move {
            let _in_flight = in_flight;
            let outcome = match end {
                End::Running(job) => work::finish(job).await.map_err(OpenAiError::from),
                End::Done(answer) => Ok(answer),
            };
            if let Ok(answer) = &outcome {
                let completion = &answer.generation.completion;
                let mut totals = lock(&totals);
                totals.prompt_tokens.get_or_insert(completion.prompt_tokens);
                totals.completion_tokens += completion.tokens_generated;
            }
            self.closing(index, outcome, include_usage)
        });
        stream::iter(opening).chain(texts).chain(closing)
    }

    fn text_chunk(
        &self,
        index: usize,
        piece: &Emitted,
        offset: usize,
        include_usage: bool,
    ) -> Event {
        let logprobs = self.logprobs_json(&piece.logprobs, offset);
        let content = match self.route {
            Route::Completion => json!(piece.text),
            Route::Chat => json!({ "content": piece.text }),
        };
        self.chunk(index, content, logprobs, None, include_usage)
    }

    /// A streamed chat answer's call number `number`, whole.
    fn tool_call_chunk(
        &self,
        index: usize,
        call: &ToolCall,
        number: usize,
        include_usage: bool,
    ) -> Event {
        let mut call = tool_call_json(call);
        call["index"] = json!(number);
        self.chunk(
            index,
            json!({ "tool_calls": [call] }),
            Value::Null,
            None,
            include_usage,
        )
    }

    /// `logprobs` in the route's shape; `null` unless asked for. `offset`: where the
    /// tokens' text begins in the whole answer.
    fn logprobs_json(&self, logprobs: &[TokenLogprob], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match self.route {
            Route::Chat => {
                let content: Vec<Value> = logprobs
                    .iter()
                    .map(|logprob| {
                        let top: Vec<Value> = logprob
                            .top
                            .iter()
                            .map(|(token, logprob)| {
                                json!({
                                    "token": text(&token.bytes),
                                    "logprob": logprob,
                                    "bytes": token.bytes,
                                })
                            })
                            .collect();
                        json!({
                            "token": text(&logprob.token.bytes),
                            "logprob": logprob.logprob,
                            "bytes": logprob.token.bytes,
                            "top_logprobs": top,
                        })
                    })
                    .collect();
                json!({ "content": content, "refusal": null })
            }
            Route::Completion => {
                let mut text_offset = Vec::with_capacity(logprobs.len());
                let mut at = offset;
                for logprob in logprobs {
                    text_offset.push(at);
                    at += logprob.token.bytes.len();
                }
                let top: Vec<Value> = logprobs
                    .iter()
                    .map(|logprob| {
                        let alternatives: serde_json::Map<String, Value> = logprob
                            .top
                            .iter()
                            .map(|(token, logprob)| (text(&token.bytes), json!(logprob)))
                            .collect();
                        Value::Object(alternatives)
                    })
                    .collect();
                json!({
                    "tokens": logprobs.iter().map(|l| text(&l.token.bytes)).collect::<Vec<_>>(),
                    "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    /// The event after a choice's last piece: its finish reason, or its error.
    fn closing(
        &self,
        index: usize,
        outcome: Result<AgentAnswer, OpenAiError>,
        include_usage: bool,
    ) -> Event {
        match outcome {
            Ok(AgentAnswer {
                generation: Generation { completion, .. },
                tool_calls,
            }) => {
                let empty = match self.route {
                    Route::Completion => json!(""),
                    Route::Chat => json!({}),
                };
                let reason = finish_reason(completion.finish_reason, &tool_calls);
                self.chunk(index, empty, Value::Null, Some(reason), include_usage)
            }
            Err(error) => data(&json!({ "error": error.detail() })),
        }
    }

    /// One chunk with choice `index`: `delta` (chat) or `text` (completion).
    fn chunk(
        &self,
        index: usize,
        content: Value,
        logprobs: Value,
        finish_reason: Option<&str>,
        include_usage: bool,
    ) -> Event {
        let choice = match self.route {
            Route::Completion => json!({
                "index": index,
                "text": content,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Route::Chat => json!({
                "index": index,
                "delta": content,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        let mut chunk = self.body(json!([choice]));
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        data(&chunk)
    }

    fn event(&self, choices: Value, usage: Value) -> Event {
        let mut chunk = self.body(choices);
        chunk["usage"] = usage;
        data(&chunk)
    }

    fn body(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.route, chunk) {
            (Route::Completion, _) => "text_completion",
            (Route::Chat, false) => "chat.completion",
            (Route::Chat, true) => "chat.completion.chunk",
        }
    }
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

/// OpenAI's finish reasons: an end-of-sequence token and a stop string are both `stop`, or
/// `tool_calls` when the answer made calls; `length` whatever was made before the cut.
fn finish_reason(reason: FinishReason, tool_calls: &[ToolCall]) -> &'static str {
    if !tool_calls.is_empty() && matches!(reason, FinishReason::Eos | FinishReason::Stop) {
        return "tool_calls";
    }
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only seen by a client that is gone; say something true anyway.
        FinishReason::Cancelled => "abort",
    }
}

/// A call in OpenAI's shape, with an id of the host's (`call_` and 24 hex digits, as
/// OpenAI's look), so that ids are unique whatever the guest chose.
fn tool_call_json(call: &ToolCall) -> Value {
    let id = uuid::Uuid::new_v4().simple().to_string();
    json!({
        "id": format!("call_{}", &id[..24]),
        "type": "function",
        "function": { "name": call.name, "arguments": call.arguments },
    })
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn lock(totals: &Mutex<Totals>) -> std::sync::MutexGuard<'_, Totals> {
    totals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
