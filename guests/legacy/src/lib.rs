//! A guest built against the contract as it was before structured output and
//! log-probabilities were added (`wit/worker.wit` here is that file, frozen): the test that a
//! guest written for an older host keeps serving, unchanged, on this one. It serves
//! `/v1/infer` and the OpenAI routes greedily; the host refuses agent clients' fields for it
//! (it has no `openai-agents` export), naming the field.

wit_bindgen::generate!({ path: "wit", world: "openai-worker" });

use exports::rbee::worker::{handler, openai};
use rbee::worker::inference::{self, StreamItem};
use rbee::worker::output;
use rbee::worker::types::{
    ChatRequest, Completion, CompletionRequest, GenerationOptions, InferError, InferRequest,
    InferResponse, PromptPart, SamplingParams,
};

struct Legacy;

fn greedy(max_tokens: Option<u32>, stop: Vec<String>) -> SamplingParams {
    SamplingParams {
        max_tokens: max_tokens.unwrap_or(16),
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repeat_penalty: 1.0,
        seed: None,
        stop,
    }
}

/// The generation, streamed through `output.emit` when asked.
fn run(prompt: &[PromptPart], options: &GenerationOptions) -> Result<Completion, InferError> {
    let params = greedy(options.max_tokens, options.stop.clone());
    if !options.stream {
        return inference::infer_parts(prompt, &params);
    }
    let stream = inference::infer_stream_parts(prompt, &params)?;
    loop {
        match stream.next()? {
            StreamItem::Text(text) => output::emit(&text)?,
            StreamItem::Done(completion) => return Ok(completion),
        }
    }
}

impl handler::Guest for Legacy {
    fn handle(request: InferRequest) -> Result<InferResponse, InferError> {
        let completion =
            inference::infer(&request.prompt, &greedy(request.max_tokens, request.stop))?;
        Ok(InferResponse {
            text: completion.text,
            tokens_generated: completion.tokens_generated,
        })
    }
}

impl openai::Guest for Legacy {
    fn complete(request: CompletionRequest) -> Result<Completion, InferError> {
        run(&[PromptPart::Markup(request.prompt)], &request.options)
    }

    fn chat(request: ChatRequest) -> Result<Completion, InferError> {
        // No template: the last message's words, as plain text.
        let last = request
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        run(&[PromptPart::Text(last)], &request.options)
    }
}

export!(Legacy);
