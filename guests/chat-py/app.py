"""The chat guest, in Python (componentize-py).

Same behaviour as the Rust reference (guests/chat/src/lib.rs); guests/README.md, "The chat
guest", is the specification all four languages follow.
"""

from wit_world import exports
from wit_world.imports import inference, log, output, types

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 0
DEFAULT_TOP_P = 0.95
DEFAULT_REPEAT_PENALTY = 1.0
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


class Handler(exports.Handler):
    def handle(self, request: types.InferRequest) -> types.InferResponse:
        params = with_defaults(request)
        template = inference.model().chat_template
        chatml = template is not None and IM_START in template
        prompt = request.prompt
        if chatml:
            params.stop.append(IM_END)
            prompt = f"{IM_START}user\n{request.prompt}{IM_END}\n{IM_START}assistant\n"
        log.log(
            log.Level.INFO,
            f"chat: template={'chatml' if chatml else 'none'} "
            f"stream={'true' if request.stream else 'false'} "
            f"prompt_chars={len(request.prompt)} max_tokens={params.max_tokens} "
            f"temperature={two_decimals(params.temperature)} stops={len(params.stop)}",
        )
        if request.stream:
            return stream(prompt, params)
        completion = inference.infer(prompt, params)
        text = completion.text
        at = find_stop(text, params.stop)
        if at is not None:
            text = text[:at]
        return types.InferResponse(text=text, tokens_generated=completion.tokens_generated)


def with_defaults(request: types.InferRequest) -> types.SamplingParams:
    """The sampling parameters: the client's, with the defaults for what it left out (ranges
    are the host's and the engine's to check)."""

    def default(value, fallback):
        return fallback if value is None else value

    return types.SamplingParams(
        max_tokens=default(request.max_tokens, DEFAULT_MAX_TOKENS),
        temperature=default(request.temperature, DEFAULT_TEMPERATURE),
        top_k=default(request.top_k, DEFAULT_TOP_K),
        top_p=default(request.top_p, DEFAULT_TOP_P),
        repeat_penalty=default(request.repeat_penalty, DEFAULT_REPEAT_PENALTY),
        seed=request.seed,
        stop=list(request.stop),
    )


def stream(prompt: str, params: types.SamplingParams) -> types.InferResponse:
    """Streams through output.emit, holding back any tail that may begin a stop string."""
    sent = []
    pending = ""
    pieces = 0
    # Leaving the `with` block drops the stream, which stops the generation.
    with inference.infer_stream(prompt, params) as tokens:
        while True:
            item = tokens.next()
            if isinstance(item, inference.StreamItem_Text):
                pieces += 1
                pending += item.value
                at = find_stop(pending, params.stop)
                if at is not None:
                    send(sent, pending[:at])
                    return types.InferResponse(text="".join(sent), tokens_generated=pieces)
                ready = len(pending) - held_back(pending, params.stop)
                send(sent, pending[:ready])
                pending = pending[ready:]
            else:
                send(sent, pending)
                return types.InferResponse(
                    text="".join(sent), tokens_generated=item.value.tokens_generated
                )


def two_decimals(value: float) -> str:
    """value with two decimals, rounding halves up, computed the same way in every language."""
    hundredths = int(value * 100.0 + 0.5)
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def send(sent: list, text: str) -> None:
    """Emits text (nothing when it is empty) and records it as sent."""
    if text:
        output.emit(text)
        sent.append(text)


def find_stop(text: str, stops: list) -> int | None:
    """Where the stop string that is complete first begins (earliest end, then earliest start)."""
    found = [(at + len(stop), at) for stop in stops if (at := text.find(stop)) >= 0]
    return min(found)[1] if found else None


def held_back(text: str, stops: list) -> int:
    """Length of the longest tail of text that is a proper beginning of some stop string."""
    return max(
        (n for stop in stops for n in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:n])),
        default=0,
    )
