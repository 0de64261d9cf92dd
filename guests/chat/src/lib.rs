//! The chat guest, in Rust. The same behaviour is implemented in Python (`guests/chat-py`),
//! JavaScript (`guests/chat-js`) and C (`guests/chat-c`); `guests/README.md` ("The chat guest")
//! is the specification all four follow, and the conformance test checks they agree.
//!
//! 1. Fill the defaults for what the client left out (ranges are the host's and the engine's
//!    to check; see `sampling-params` in the WIT).
//! 2. Wrap the prompt in ChatML when the model's chat template uses `<|im_start|>`.
//! 3. Generate with the request's stop strings (plus `<|im_end|>` under ChatML), applying them
//!    here too: text that could still become a stop string is withheld until it cannot.
//! 4. Stream through `output.emit` when asked, otherwise answer once.

wit_bindgen::generate!({ path: "../../wit", world: "worker" });

use exports::rbee::worker::handler::Guest;
use rbee::worker::inference::{self, StreamItem};
use rbee::worker::log::{Level, log};
use rbee::worker::output;
use rbee::worker::types::{InferError, InferRequest, InferResponse, SamplingParams};

const DEFAULT_MAX_TOKENS: u32 = 256;
const DEFAULT_TEMPERATURE: f32 = 0.7;
const DEFAULT_TOP_K: u32 = 0;
const DEFAULT_TOP_P: f32 = 0.95;
const DEFAULT_REPEAT_PENALTY: f32 = 1.0;
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

struct Chat;

impl Guest for Chat {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let params = with_defaults(&request);
        let chatml = inference::model()
            .chat_template
            .is_some_and(|template| template.contains(IM_START));
        let (prompt, params) = if chatml {
            let mut params = params;
            params.stop.push(IM_END.to_string());
            (
                format!(
                    "{IM_START}user\n{}{IM_END}\n{IM_START}assistant\n",
                    request.prompt
                ),
                params,
            )
        } else {
            (request.prompt.clone(), params)
        };
        log(
            Level::Info,
            &format!(
                "chat: template={} stream={} prompt_chars={} max_tokens={} temperature={} stops={}",
                if chatml { "chatml" } else { "none" },
                request.stream,
                request.prompt.chars().count(),
                params.max_tokens,
                two_decimals(params.temperature),
                params.stop.len(),
            ),
        );
        if request.stream {
            stream(&prompt, &params)
        } else {
            let completion = inference::infer(&prompt, &params)?;
            let text = match find_stop(&completion.text, &params.stop) {
                Some(at) => completion.text[..at].to_string(),
                None => completion.text,
            };
            Ok(InferResponse {
                text,
                tokens_generated: completion.tokens_generated,
            })
        }
    }
}

/// The sampling parameters: the client's, with the defaults for what it left out.
fn with_defaults(request: &InferRequest) -> SamplingParams {
    SamplingParams {
        max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        temperature: request.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k: request.top_k.unwrap_or(DEFAULT_TOP_K),
        top_p: request.top_p.unwrap_or(DEFAULT_TOP_P),
        repeat_penalty: request.repeat_penalty.unwrap_or(DEFAULT_REPEAT_PENALTY),
        seed: request.seed,
        stop: request.stop.clone(),
    }
}

/// Streams the generation through `output.emit`, holding back any tail of the text that is
/// the beginning of a stop string until the next piece shows whether it completes it.
fn stream(prompt: &str, params: &SamplingParams) -> Result<InferResponse, InferError> {
    let tokens = inference::infer_stream(prompt, params)?;
    let mut sent = String::new();
    let mut pending = String::new();
    let mut pieces = 0u32;
    loop {
        match tokens.next()? {
            StreamItem::Text(piece) => {
                pieces += 1;
                pending.push_str(&piece);
                if let Some(at) = find_stop(&pending, &params.stop) {
                    // Dropping `tokens` (on return) stops the generation.
                    send(&mut sent, &pending[..at])?;
                    return Ok(InferResponse {
                        text: sent,
                        tokens_generated: pieces,
                    });
                }
                let keep = held_back(&pending, &params.stop);
                let ready = pending.len() - keep;
                send(&mut sent, &pending[..ready])?;
                pending.drain(..ready);
            }
            StreamItem::Done(completion) => {
                send(&mut sent, &pending)?;
                return Ok(InferResponse {
                    text: sent,
                    tokens_generated: completion.tokens_generated,
                });
            }
        }
    }
}

/// `value` with two decimals, rounding halves up, computed the same way in every language.
fn two_decimals(value: f32) -> String {
    let hundredths = (f64::from(value) * 100.0 + 0.5) as u32;
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// Emits `text` (nothing when it is empty) and records it as sent.
fn send(sent: &mut String, text: &str) -> Result<(), InferError> {
    if text.is_empty() {
        return Ok(());
    }
    output::emit(text)?;
    sent.push_str(text);
    Ok(())
}

/// Where the stop string that is complete first in `text` begins: the occurrence that ends
/// earliest (on a tie, the one that starts earliest), so that cutting a whole text and cutting
/// a stream piece by piece agree.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| text.find(stop.as_str()).map(|at| (at + stop.len(), at)))
        .min()
        .map(|(_, at)| at)
}

/// The length of the longest tail of `text` that is a proper beginning of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| (1..stop.len().min(text.len() + 1)).map(move |n| (stop, n)))
        .filter(|(stop, n)| stop.is_char_boundary(*n) && text.ends_with(&stop[..*n]))
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0)
}

export!(Chat);
