//! What the WebAssembly guest costs per request: the same request served through the guest
//! (fresh instance + call + the host calls it makes) and with the engine called directly, in
//! one run, on one model. Prints both and their ratio, then the OpenAI routes' guest calls
//! (`openai.complete` with the same prompt, `openai.chat` rendering the model's chat
//! template) against the `/v1/infer` one.
//!
//!     cargo run -p rbee-host --example guest_overhead -- --model engine/tests/fixtures/tiny-llama \
//!         [--guest guests/llm.wasm] [--requests 200] [--tokens 1,16]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{PROMPT, greedy_request};
use rbee_engine::{Engine, LoadOptions, SamplingParams};
use rbee_host::guest::{
    AgentChatRequest, AgentFields, AgentMessage, AgentRole, Cancellation, CompletionRequest,
    GenerationOptions, GuestLimits, GuestRuntime, GuestRuntimeSettings, GuestSource, OpenAiCall,
    OpenAiRequest, RequestContext, ToolChoice,
};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "guests/llm.wasm")]
    guest: PathBuf,
    #[arg(long, default_value_t = 200)]
    requests: u32,
    /// Generated tokens per request; one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    tokens: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = Arc::new(Engine::load(&args.model, &LoadOptions::default())?);
    let runtime = GuestRuntime::start(
        GuestRuntimeSettings {
            limits: GuestLimits {
                time: Duration::from_secs(10),
                memory_bytes: 256 << 20,
            },
            max_instances: 8,
            cache_dir: None,
        },
        GuestSource::File(args.guest.clone()),
    )?;
    let guest = runtime.active();
    println!(
        "model {} on {}, guest {} ({} requests per row)",
        model.info().id,
        model.info().device,
        guest.meta.name,
        args.requests
    );
    println!(
        "{:>7} {:>14} {:>14} {:>14} {:>7}",
        "tokens", "direct", "guest", "overhead", "ratio"
    );
    let context = || RequestContext {
        model: model.clone(),
        client: None,
        cancellation: Cancellation::for_request(Arc::new(AtomicBool::new(false))),
        metrics: None,
    };
    let mut openai_rows = Vec::new();
    for &tokens in &args.tokens {
        let params = SamplingParams::greedy(tokens);
        let request = greedy_request(tokens, false);
        // Warm both paths (pool slots, caches) before timing; then interleave them so drift
        // in machine load affects both alike.
        let direct_once = || -> anyhow::Result<String> {
            Ok(model
                .generate(
                    PROMPT,
                    &params,
                    &mut |_| std::ops::ControlFlow::Continue(()),
                )?
                .text)
        };
        let guest_once = || -> anyhow::Result<String> {
            Ok(runtime
                .handle(&guest, request.clone(), context())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .text)
        };
        let options = GenerationOptions {
            max_tokens: Some(tokens),
            temperature: Some(0.0),
            top_k: None,
            top_p: None,
            repeat_penalty: None,
            seed: None,
            stop: Vec::new(),
            stream: false,
        };
        let openai_once = |request: OpenAiRequest| -> anyhow::Result<String> {
            Ok(runtime
                .openai(&guest, request, context())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .generation
                .completion
                .text)
        };
        let completion = || OpenAiRequest {
            call: OpenAiCall::Completion(CompletionRequest {
                prompt: PROMPT.into(),
                options: options.clone(),
            }),
            agent: AgentFields::default(),
        };
        let chat = || OpenAiRequest {
            call: OpenAiCall::Chat(AgentChatRequest {
                messages: vec![AgentMessage {
                    role: AgentRole::User,
                    content: PROMPT.into(),
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                    name: None,
                }],
                options: options.clone(),
                tools: Vec::new(),
                tool_choice: ToolChoice::None,
                parallel_tool_calls: false,
            }),
            agent: AgentFields::default(),
        };
        assert_eq!(
            direct_once()?,
            guest_once()?,
            "the guest changed the answer"
        );
        assert_eq!(
            guest_once()?,
            openai_once(completion())?,
            "/v1/completions answered other text than /v1/infer"
        );
        openai_once(chat())?;
        let (mut direct, mut through_guest) = (Duration::ZERO, Duration::ZERO);
        let (mut completions, mut chats) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..args.requests {
            let started = Instant::now();
            direct_once()?;
            direct += started.elapsed();
            let started = Instant::now();
            guest_once()?;
            through_guest += started.elapsed();
            let started = Instant::now();
            openai_once(completion())?;
            completions += started.elapsed();
            let started = Instant::now();
            openai_once(chat())?;
            chats += started.elapsed();
        }
        let (direct, through_guest) = (direct / args.requests, through_guest / args.requests);
        openai_rows.push((
            tokens,
            through_guest,
            completions / args.requests,
            chats / args.requests,
        ));
        println!(
            "{tokens:>7} {:>14?} {:>14?} {:>14?} {:>7.3}",
            direct,
            through_guest,
            through_guest.saturating_sub(direct),
            through_guest.as_secs_f64() / direct.as_secs_f64()
        );
    }
    println!();
    println!(
        "{:>7} {:>14} {:>14} {:>14} {:>9} {:>9}",
        "tokens", "/v1/infer", "completions", "chat", "ratio", "ratio"
    );
    for (tokens, infer, completions, chat) in openai_rows {
        println!(
            "{tokens:>7} {infer:>14?} {completions:>14?} {chat:>14?} {:>9.3} {:>9.3}",
            completions.as_secs_f64() / infer.as_secs_f64(),
            chat.as_secs_f64() / infer.as_secs_f64(),
        );
    }
    Ok(())
}
