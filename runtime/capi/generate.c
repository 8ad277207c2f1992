/* llmx_generate and llmx_generate_text: one onnxruntime-genai generator per call runs the model
 * (the prompt, then each kept token) and this library samples from its logits, so stopping
 * (EOS ids, ignore_eos, max_new_tokens, a full cache, the callback) and sampling follow the
 * Python runtime, not genai's own search. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "sampling.h"

typedef struct {
    int32_t *ids;
    size_t n, capacity;
    const char *reason; /* eos, length, max_seq_len, callback */
} output;

static int push(output *out, int32_t token) {
    if (out->n == out->capacity) {
        size_t grown = out->capacity ? 2 * out->capacity : 64;
        int32_t *bigger = realloc(out->ids, grown * sizeof *bigger);
        if (!bigger) return -1;
        out->ids = bigger, out->capacity = grown;
    }
    out->ids[out->n++] = token;
    return 0;
}

static int is_eos(const session *s, int32_t token) {
    for (size_t i = 0; i < s->n_eos; i++)
        if (s->eos[i] == token) return 1;
    return 0;
}

/* A generator with room for the prompt and every token but the last (never fed back). */
static int start(const session *s, size_t prompt_len, const llmx_sampling *p, OgaGenerator **out) {
    OgaGeneratorParams *params = NULL;
    OgaResult *r = OgaCreateGeneratorParams(s->model, &params);
    size_t room = prompt_len + (size_t)p->max_new_tokens - 1;
    if (!r) r = OgaGeneratorParamsSetSearchNumber(params, "max_length", (double)(room < (size_t)s->max_seq_len ? room : (size_t)s->max_seq_len));
    if (!r) r = OgaCreateGenerator(s->model, params, out);
    if (params) OgaDestroyGeneratorParams(params);
    return r ? llmx_oga_fail(LLMX_ERROR_INTERNAL, r, "creating a generator") : LLMX_OK;
}

/* Generate from `prompt` into `out`, calling `callback` per token. */
static int run(const session *s, const int32_t *prompt, size_t n, const llmx_sampling *p,
               llmx_token_callback callback, void *user_data, output *out) {
    if (n == 0) return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "the prompt is empty: give at least one token id");
    for (size_t i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= s->vocab_size)
            return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "prompt token %d (position %zu) is not a token id of this "
                             "bundle: ids are 0..%d", prompt[i], i, s->vocab_size - 1);
    if (n > (size_t)s->max_seq_len)
        return llmx_fail(LLMX_ERROR_LIMIT, "prompt of %zu tokens exceeds the bundle's max_seq_len=%d", n,
                         s->max_seq_len);
    sampler picker;
    OgaGenerator *generator = NULL;
    OgaTokenizerStream *text = NULL;
    OgaTensor *logits = NULL;
    int status = LLMX_OK;
    if (sampler_init(&picker, p, s->vocab_size, prompt, n) != 0) {
        status = llmx_fail(LLMX_ERROR_INTERNAL, "out of memory for the sampler");
        goto done;
    }
    if ((status = start(s, n, p, &generator)) != LLMX_OK) goto done;
    OgaResult *r = NULL;
    if (callback && s->tokenizer && (r = OgaCreateTokenizerStream(s->tokenizer, &text)) != NULL) {
        status = llmx_oga_fail(LLMX_ERROR_INTERNAL, r, "creating the text stream");
        goto done;
    }
    const int32_t *feed = prompt;
    size_t feed_len = n, filled = n; /* filled: tokens in the cache once `feed` has run */
    for (;;) {
        void *data = NULL;
        if ((r = OgaGenerator_AppendTokens(generator, feed, feed_len)) != NULL ||
            (r = OgaGenerator_GetLogits(generator, &logits)) != NULL ||
            (r = OgaTensorGetData(logits, &data)) != NULL) {
            status = llmx_oga_fail(LLMX_ERROR_INTERNAL, r, "running the model");
            goto done;
        }
        int32_t token = sampler_next(&picker, (const float *)data); /* logits (1, 1, V) */
        OgaDestroyTensor(logits);
        logits = NULL;
        if (push(out, token) != 0) {
            status = llmx_fail(LLMX_ERROR_INTERNAL, "out of memory for the output");
            goto done;
        }
        out->reason = !p->ignore_eos && is_eos(s, token)       ? "eos"
                      : out->n >= (size_t)p->max_new_tokens     ? "length"
                      : filled >= (size_t)s->max_seq_len        ? "max_seq_len" /* no slot to decode it into */
                                                                : NULL;
        if (callback) {
            const char *delta = "";
            if (text && (r = OgaTokenizerStreamDecode(text, token, &delta)) != NULL) {
                OgaDestroyResult(r);
                delta = "";
            }
            if (callback(token, delta ? delta : "", user_data) != 0) out->reason = "callback";
        }
        if (out->reason) break;
        feed = &out->ids[out->n - 1], feed_len = 1, filled++;
    }
done:
    if (logits) OgaDestroyTensor(logits);
    if (text) OgaDestroyTokenizerStream(text);
    if (generator) OgaDestroyGenerator(generator);
    sampler_free(&picker);
    return status;
}

int llmx_generate(llmx_session *handle, const int32_t *prompt, size_t prompt_len, const llmx_sampling *given,
                  llmx_token_callback callback, void *user_data, int32_t *out_ids, size_t out_capacity,
                  size_t *out_len, char **finish_reason) {
    llmx_clear_error();
    if (!prompt && prompt_len) return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_generate: prompt is NULL");
    if (!out_ids && out_capacity)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_generate: out_ids is NULL but out_capacity > 0");
    session *s = llmx_acquire(handle);
    if (!s) return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_generate: unknown or closed session");
    llmx_sampling p;
    output out = {0};
    int status = llmx_read_sampling(given, &p);
    if (status == LLMX_OK) status = run(s, prompt, prompt_len, &p, callback, user_data, &out);
    llmx_release(handle);
    if (status == LLMX_OK) {
        for (size_t i = 0; i < out.n && i < out_capacity; i++) out_ids[i] = out.ids[i];
        if (out_len) *out_len = out.n;
        if (finish_reason && !(*finish_reason = llmx_strdup(out.reason)))
            status = llmx_fail(LLMX_ERROR_INTERNAL, "llmx_generate: out of memory");
    }
    free(out.ids);
    return status;
}

/* The prompt's token ids by the bundle's tokenizer (*ids malloc'ed). */
static int encode(const session *s, const char *text, int32_t **ids, size_t *n) {
    OgaSequences *sequences = NULL;
    OgaResult *r = OgaCreateSequences(&sequences);
    if (!r) r = OgaTokenizerEncode(s->tokenizer, text, sequences);
    if (r) {
        if (sequences) OgaDestroySequences(sequences);
        return llmx_oga_fail(LLMX_ERROR_INVALID_ARGUMENT, r, "llmx_generate_text: encoding the prompt");
    }
    *n = OgaSequencesGetSequenceCount(sequences, 0);
    *ids = malloc((*n ? *n : 1) * sizeof **ids);
    if (*ids) memcpy(*ids, OgaSequencesGetSequenceData(sequences, 0), *n * sizeof **ids);
    OgaDestroySequences(sequences);
    return *ids ? LLMX_OK : llmx_fail(LLMX_ERROR_INTERNAL, "llmx_generate_text: out of memory");
}

int llmx_generate_text(llmx_session *handle, const char *prompt, const llmx_sampling *given, char **out_text) {
    llmx_clear_error();
    if (!prompt || !out_text)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_generate_text: prompt and out_text must not be NULL");
    *out_text = NULL;
    session *s = llmx_acquire(handle);
    if (!s) return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_generate_text: unknown or closed session");
    llmx_sampling p;
    output out = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    int status = llmx_read_sampling(given, &p);
    if (status == LLMX_OK && !s->tokenizer)
        status = llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "this bundle has no tokenizer onnxruntime-genai reads (%s): "
                           "use llmx_generate with token ids", s->tokenizer_error);
    if (status == LLMX_OK) status = encode(s, prompt, &ids, &n);
    if (status == LLMX_OK) status = run(s, ids, n, &p, NULL, NULL, &out);
    if (status == LLMX_OK) {
        const char *text = NULL;
        OgaResult *r = OgaTokenizerDecode(s->tokenizer, out.ids, out.n, &text);
        if (r) {
            status = llmx_oga_fail(LLMX_ERROR_INTERNAL, r, "llmx_generate_text: decoding the reply");
        } else {
            if (!(*out_text = llmx_strdup(text))) status = llmx_fail(LLMX_ERROR_INTERNAL, "out of memory");
            OgaDestroyString(text);
        }
    }
    llmx_release(handle);
    free(ids);
    free(out.ids);
    return status;
}
