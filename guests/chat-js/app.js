// The chat guest, in JavaScript (componentize-qjs, built with --sync).
//
// Same behaviour as the Rust reference (guests/chat/src/lib.rs); guests/README.md, "The chat
// guest", is the specification all four languages follow.
//
// Bindings: WIT records are objects with camelCase keys, `option` is the value or null,
// variants are `{ tag, val }`, and a function returning `result` returns the ok value and
// throws the error value (for imports and for our export alike).

import inference from "rbee:worker/inference@0.1.0";
import output from "rbee:worker/output@0.1.0";
import log from "rbee:worker/log@0.1.0";

const DEFAULT_MAX_TOKENS = 256;
const DEFAULT_TEMPERATURE = 0.7;
const DEFAULT_TOP_K = 0;
const DEFAULT_TOP_P = 0.95;
const DEFAULT_REPEAT_PENALTY = 1.0;
const IM_START = "<|im_start|>";
const IM_END = "<|im_end|>";

export const handler = {
  handle(request) {
    const params = withDefaults(request);
    const template = inference.model().chatTemplate;
    const chatml = template != null && template.includes(IM_START);
    let prompt = request.prompt;
    if (chatml) {
      params.stop.push(IM_END);
      prompt = `${IM_START}user\n${request.prompt}${IM_END}\n${IM_START}assistant\n`;
    }
    log.log(
      "info",
      `chat: template=${chatml ? "chatml" : "none"} stream=${request.stream} ` +
        `prompt_chars=${[...request.prompt].length} max_tokens=${params.maxTokens} ` +
        `temperature=${twoDecimals(params.temperature)} stops=${params.stop.length}`,
    );
    if (request.stream) return stream(prompt, params);
    const completion = inference.infer(prompt, params);
    let text = completion.text;
    const at = findStop(text, params.stop);
    if (at !== null) text = text.slice(0, at);
    return { text, tokensGenerated: completion.tokensGenerated };
  },
};

// The sampling parameters: the client's, with the defaults for what it left out (ranges are
// the host's and the engine's to check).
function withDefaults(request) {
  return {
    maxTokens: request.maxTokens ?? DEFAULT_MAX_TOKENS,
    temperature: request.temperature ?? DEFAULT_TEMPERATURE,
    topK: request.topK ?? DEFAULT_TOP_K,
    topP: request.topP ?? DEFAULT_TOP_P,
    repeatPenalty: request.repeatPenalty ?? DEFAULT_REPEAT_PENALTY,
    seed: request.seed,
    stop: [...request.stop],
  };
}

// Streams through output.emit, holding back any tail that may begin a stop string.
function stream(prompt, params) {
  const tokens = inference.inferStream(prompt, params);
  try {
    let sent = "";
    let pending = "";
    let pieces = 0;
    const send = (text) => {
      if (text === "") return;
      output.emit(text);
      sent += text;
    };
    for (;;) {
      const item = tokens.next();
      if (item.tag === "text") {
        pieces += 1;
        pending += item.val;
        const at = findStop(pending, params.stop);
        if (at !== null) {
          send(pending.slice(0, at));
          return { text: sent, tokensGenerated: pieces };
        }
        const ready = pending.length - heldBack(pending, params.stop);
        send(pending.slice(0, ready));
        pending = pending.slice(ready);
      } else {
        send(pending);
        return { text: sent, tokensGenerated: item.val.tokensGenerated };
      }
    }
  } finally {
    // Dropping the stream stops the generation.
    tokens[Symbol.dispose]();
  }
}

// value with two decimals, rounding halves up, computed the same way in every language.
function twoDecimals(value) {
  const hundredths = Math.trunc(value * 100.0 + 0.5);
  return `${Math.trunc(hundredths / 100)}.${String(hundredths % 100).padStart(2, "0")}`;
}

// Where the stop string that is complete first begins (earliest end, then earliest start).
function findStop(text, stops) {
  let best = null;
  for (const stop of stops) {
    const at = text.indexOf(stop);
    if (at < 0) continue;
    const end = at + stop.length;
    if (best === null || end < best.end || (end === best.end && at < best.at)) {
      best = { end, at };
    }
  }
  return best === null ? null : best.at;
}

// Length of the longest tail of text that is a proper beginning of some stop string.
function heldBack(text, stops) {
  let longest = 0;
  for (const stop of stops) {
    for (let n = 1; n < stop.length && n <= text.length; n++) {
      if (n > longest && text.endsWith(stop.slice(0, n))) longest = n;
    }
  }
  return longest;
}
