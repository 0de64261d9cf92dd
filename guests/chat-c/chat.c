// The chat guest, in C (wit-bindgen c, wasi-libc, the WASI preview1 adapter).
//
// Same behaviour as the Rust reference (guests/chat/src/lib.rs); guests/README.md, "The chat
// guest", is the specification all four languages follow.
//
// Memory: the request is ours (freed at the end), strings we return are freed by the host's
// post-return call (so they are malloc'd), arguments we pass to imports stay ours, and values
// imports return are ours to free. Every request runs in a fresh instance, but this guest
// frees what it allocates anyway.

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

#define DEFAULT_MAX_TOKENS 256
#define DEFAULT_TEMPERATURE 0.7f
#define DEFAULT_TOP_K 0
#define DEFAULT_TOP_P 0.95f
#define DEFAULT_REPEAT_PENALTY 1.0f
#define IM_START "<|im_start|>"
#define IM_END "<|im_end|>"

typedef rbee_worker_types_infer_error_t infer_error_t;

// ---- a growable byte string ----

typedef struct {
    char *ptr;
    size_t len, cap;
} buf_t;

static void buf_append(buf_t *buf, const void *data, size_t len) {
    if (buf->len + len > buf->cap) {
        size_t cap = buf->cap ? buf->cap * 2 : 64;
        while (cap < buf->len + len) cap *= 2;
        buf->ptr = realloc(buf->ptr, cap);
        if (!buf->ptr) abort();
        buf->cap = cap;
    }
    if (len) memcpy(buf->ptr + buf->len, data, len);
    buf->len += len;
}

static void buf_append_str(buf_t *buf, const char *s) { buf_append(buf, s, strlen(s)); }

// Removes the first `n` bytes.
static void buf_consume(buf_t *buf, size_t n) {
    memmove(buf->ptr, buf->ptr + n, buf->len - n);
    buf->len -= n;
}

// Moves the bytes into a component-model string (ownership goes with them).
static worker_string_t buf_take(buf_t *buf) {
    worker_string_t s;
    worker_string_dup_n(&s, buf->ptr ? buf->ptr : "", buf->len);
    free(buf->ptr);
    *buf = (buf_t){0};
    return s;
}

static worker_string_t view(const char *ptr, size_t len) {
    return (worker_string_t){.ptr = (uint8_t *)ptr, .len = len};
}

// ---- stop strings ----

static long find(const char *text, size_t len, const worker_string_t *needle) {
    if (needle->len > len) return -1;
    for (size_t at = 0; at + needle->len <= len; at++) {
        if (memcmp(text + at, needle->ptr, needle->len) == 0) return (long)at;
    }
    return -1;
}

// Where the stop string that is complete first in `text` begins: the occurrence that ends
// earliest (on a tie, the one that starts earliest); -1 when none is complete.
static long find_stop(const char *text, size_t len, const worker_list_string_t *stops) {
    long best_at = -1;
    size_t best_end = 0;
    for (size_t i = 0; i < stops->len; i++) {
        long at = find(text, len, &stops->ptr[i]);
        if (at < 0) continue;
        size_t end = (size_t)at + stops->ptr[i].len;
        if (best_at < 0 || end < best_end || (end == best_end && at < best_at)) {
            best_at = at;
            best_end = end;
        }
    }
    return best_at;
}

// The length of the longest tail of `text` that is a proper beginning of some stop string.
static size_t held_back(const char *text, size_t len, const worker_list_string_t *stops) {
    size_t longest = 0;
    for (size_t i = 0; i < stops->len; i++) {
        const worker_string_t *stop = &stops->ptr[i];
        for (size_t n = 1; n < stop->len && n <= len; n++) {
            if (n > longest && memcmp(text + len - n, stop->ptr, n) == 0) longest = n;
        }
    }
    return longest;
}

// ---- the handler ----

static void log_line(rbee_worker_log_level_t level, const char *format, ...) {
    char line[512];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line, format, args);
    va_end(args);
    if (n < 0) return;
    worker_string_t message = view(line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    rbee_worker_log_log(level, &message);
}

// The sampling parameters: the client's, with the defaults for what it left out (ranges are the
// host's and the engine's to check). `params->stop` gets room for one more string (for
// <|im_end|>).
static void with_defaults(const rbee_worker_types_infer_request_t *request,
                          rbee_worker_types_sampling_params_t *params) {
    params->max_tokens = request->max_tokens.is_some ? request->max_tokens.val : DEFAULT_MAX_TOKENS;
    params->temperature = request->temperature.is_some ? request->temperature.val : DEFAULT_TEMPERATURE;
    params->top_k = request->top_k.is_some ? request->top_k.val : DEFAULT_TOP_K;
    params->top_p = request->top_p.is_some ? request->top_p.val : DEFAULT_TOP_P;
    params->repeat_penalty =
        request->repeat_penalty.is_some ? request->repeat_penalty.val : DEFAULT_REPEAT_PENALTY;
    params->seed = request->seed;
    // Views of the request's strings: the request outlives every use.
    params->stop.ptr = malloc((request->stop.len + 1) * sizeof(worker_string_t));
    if (!params->stop.ptr) abort();
    memcpy(params->stop.ptr, request->stop.ptr, request->stop.len * sizeof(worker_string_t));
    params->stop.len = request->stop.len;
}

// Emits `len` bytes of `text` (nothing when empty) and records them in `sent`.
static bool send(buf_t *sent, const char *text, size_t len, infer_error_t *err) {
    if (len == 0) return true;
    worker_string_t piece = view(text, len);
    if (!rbee_worker_output_emit(&piece, err)) return false;
    buf_append(sent, text, len);
    return true;
}

// Streams through output.emit, holding back any tail that may begin a stop string.
static bool stream(worker_string_t *prompt, rbee_worker_types_sampling_params_t *params,
                   rbee_worker_types_infer_response_t *ret, infer_error_t *err) {
    rbee_worker_inference_own_token_stream_t tokens;
    if (!rbee_worker_inference_infer_stream(prompt, params, &tokens, err)) return false;
    rbee_worker_inference_borrow_token_stream_t borrowed = rbee_worker_inference_borrow_token_stream(tokens);
    buf_t sent = {0}, pending = {0};
    uint32_t pieces = 0;
    bool ok = true, finished = false;
    while (ok && !finished) {
        rbee_worker_inference_stream_item_t item;
        if (!rbee_worker_inference_method_token_stream_next(borrowed, &item, err)) {
            ok = false;
            break;
        }
        if (item.tag == RBEE_WORKER_INFERENCE_STREAM_ITEM_TEXT) {
            pieces++;
            buf_append(&pending, item.val.text.ptr, item.val.text.len);
            long at = find_stop(pending.ptr, pending.len, &params->stop);
            if (at >= 0) {
                ok = send(&sent, pending.ptr, (size_t)at, err);
                ret->tokens_generated = pieces;
                finished = true;
            } else {
                size_t ready = pending.len - held_back(pending.ptr, pending.len, &params->stop);
                ok = send(&sent, pending.ptr, ready, err);
                buf_consume(&pending, ready);
            }
        } else {
            ok = send(&sent, pending.ptr, pending.len, err);
            ret->tokens_generated = item.val.done.tokens_generated;
            finished = true;
        }
        rbee_worker_inference_stream_item_free(&item);
    }
    // Dropping the stream stops the generation.
    rbee_worker_inference_token_stream_drop_own(tokens);
    free(pending.ptr);
    if (ok) {
        ret->text = buf_take(&sent);
    } else {
        free(sent.ptr);
    }
    return ok;
}

bool exports_rbee_worker_handler_handle(rbee_worker_types_infer_request_t *request,
                                        rbee_worker_types_infer_response_t *ret, infer_error_t *err) {
    rbee_worker_types_sampling_params_t params = {0};
    with_defaults(request, &params);

    rbee_worker_types_model_info_t model;
    rbee_worker_inference_model(&model);
    const worker_string_t im_start = view(IM_START, strlen(IM_START));
    bool chatml = model.chat_template.is_some &&
                  find((const char *)model.chat_template.val.ptr, model.chat_template.val.len, &im_start) >= 0;
    rbee_worker_types_model_info_free(&model);

    buf_t prompt = {0};
    if (chatml) {
        params.stop.ptr[params.stop.len++] = view(IM_END, strlen(IM_END));
        buf_append_str(&prompt, IM_START "user\n");
        buf_append(&prompt, request->prompt.ptr, request->prompt.len);
        buf_append_str(&prompt, IM_END "\n" IM_START "assistant\n");
    } else {
        buf_append(&prompt, request->prompt.ptr, request->prompt.len);
    }

    size_t prompt_chars = 0;
    for (size_t i = 0; i < request->prompt.len; i++) {
        if ((request->prompt.ptr[i] & 0xC0) != 0x80) prompt_chars++;
    }
    // Two decimals, rounding halves up, computed the same way in every language.
    unsigned hundredths = (unsigned)((double)params.temperature * 100.0 + 0.5);
    log_line(RBEE_WORKER_LOG_LEVEL_INFO,
             "chat: template=%s stream=%s prompt_chars=%zu max_tokens=%u temperature=%u.%02u stops=%zu",
             chatml ? "chatml" : "none", request->stream ? "true" : "false", prompt_chars,
             (unsigned)params.max_tokens, hundredths / 100, hundredths % 100, params.stop.len);

    worker_string_t wrapped = view(prompt.ptr ? prompt.ptr : "", prompt.len);
    bool ok;
    if (request->stream) {
        ok = stream(&wrapped, &params, ret, err);
    } else {
        rbee_worker_types_completion_t completion;
        ok = rbee_worker_inference_infer(&wrapped, &params, &completion, err);
        if (ok) {
            long at = find_stop((const char *)completion.text.ptr, completion.text.len, &params.stop);
            size_t len = at >= 0 ? (size_t)at : completion.text.len;
            worker_string_dup_n(&ret->text, (const char *)completion.text.ptr, len);
            ret->tokens_generated = completion.tokens_generated;
            rbee_worker_types_completion_free(&completion);
        }
    }
    free(prompt.ptr);
    free(params.stop.ptr);
    rbee_worker_types_infer_request_free(request);
    return ok;
}
