/*
 * llmexport C API: run llmexport bundles from C, C++, Rust, Go, ... services.
 *
 * The library (libllmexport.so, built by `llmexport capi build --out DIR`) has no Python in it:
 * it is a small C layer over onnxruntime-genai's C library (libonnxruntime-genai.so, which loads
 * ONNX Runtime's libonnxruntime.so.1 from its own folder). DIR/lib holds all three; ship that
 * folder and the bundle. The bundle must be one onnxruntime-genai reads: a folder with
 * genai_config.json (llmexport's `--target ort` bundles and onnxruntime-genai's own builder
 * write one). Its token limit (search.max_length), vocabulary size and EOS ids come from there.
 *
 * Status codes: every function returning int returns LLMX_OK (0) on success and a
 * non-zero LLMX_ERROR_* otherwise; llmx_last_error() then describes the failure. A failed
 * call leaves the session usable. The process never aborts on bad input.
 *
 * Ownership: strings passed in are borrowed for the duration of the call. Strings returned
 * by llmx_version() and llmx_last_error() are owned by the library (the latter valid until
 * the calling thread's next llmx_* call). Strings returned through char ** out-parameters are
 * owned by the caller and freed with llmx_free_string(). Text given to a callback is valid
 * only during that callback.
 *
 * Threads: sessions are independent, and one session may be shared: concurrent llmx_generate
 * calls on it from several threads run at the same time, each with its own generator and
 * parameters over the session's one copy of the weights (not batched into one decode step, as
 * llmexport's Python runtime does); llmx_close waits for calls still running on it.
 * llmx_last_error() is per thread.
 *
 * ABI stability: within major version 0 of this header, functions and struct fields are only
 * added at the end, and structs carry their own size (struct_size) so older callers keep
 * working: the library reads only the fields that fit in the caller's struct_size (the rest
 * take their defaults), and fills structs with the *_init_size functions, which write only
 * what fits in the size the caller passes. A struct_size that does not cover even the first
 * field after struct_size, or is larger than 64 KiB, is rejected with LLMX_ERROR_INVALID_ARGUMENT.
 */
#ifndef LLMEXPORT_H
#define LLMEXPORT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    LLMX_OK = 0,
    LLMX_ERROR_INVALID_ARGUMENT = 1, /* NULL pointer, bad sampling value, bad token id, ... */
    LLMX_ERROR_BUNDLE = 2,           /* missing, corrupt or incompatible bundle */
    LLMX_ERROR_LIMIT = 3,            /* prompt longer than max_seq_len, batch above max_batch */
    LLMX_ERROR_INTERNAL = 4          /* anything else; see llmx_last_error() */
};

/* Opaque handle to an open bundle on one backend/device. */
typedef struct llmx_session llmx_session;

/* Called once per generated token. Return 0 to continue, non-zero to stop generating.
 * text_delta is the text the token adds ("" when the bundle has no tokenizer onnxruntime-genai
 * reads, or while a multi-byte character is incomplete). */
typedef int (*llmx_token_callback)(int32_t token_id, const char *text_delta, void *user_data);

typedef struct {
    size_t struct_size;          /* sizeof(llmx_sampling); set by llmx_sampling_init */
    int32_t max_new_tokens;      /* >= 1 */
    float temperature;           /* 0 = greedy */
    int32_t top_k;               /* 0 = off */
    float top_p;                 /* (0, 1], 1 = off */
    float repetition_penalty;    /* > 0, 1 = off */
    uint64_t seed;               /* sampling is reproducible per seed, but draws differ from the
                                    Python runtime's (its generator is numpy's); greedy is identical */
    int32_t ignore_eos;          /* non-zero: do not stop on the bundle's EOS ids */
} llmx_sampling;

/* Library version, e.g. "0.1.0". */
const char *llmx_version(void);

/* Fill *params with defaults: 64 new tokens, greedy, no top-k/top-p/penalty, seed 0. Writes
 * exactly the fields of this first layout (up to ignore_eos), now and in every later version;
 * fields added later take their defaults unless set through llmx_sampling_init_size. */
void llmx_sampling_init(llmx_sampling *params);

/* Open the bundle directory. backend: "onnxruntime" (NULL = default; the only one); device:
 * "cpu" or "cuda" (NULL = "cpu"; "cuda" needs a CUDA build of onnxruntime-genai in DIR/lib).
 * On success *out is a new session; on failure *out is NULL. */
int llmx_open(const char *bundle_dir, const char *backend, const char *device, llmx_session **out);

/* Generate from prompt token ids. callback may be NULL. Up to out_capacity generated ids are
 * written to out_ids (may be NULL when out_capacity is 0); *out_len (may be NULL) receives the
 * number generated, which can exceed out_capacity. finish_reason (may be NULL) receives a
 * caller-owned string: "eos", "length", "max_seq_len" or "callback" ("stop", for stop strings,
 * is not produced by this library, which takes none). */
int llmx_generate(llmx_session *session, const int32_t *prompt, size_t prompt_len,
                  const llmx_sampling *params, llmx_token_callback callback, void *user_data,
                  int32_t *out_ids, size_t out_capacity, size_t *out_len, char **finish_reason);

/* Text in, text out: the prompt is encoded as it is (the tokenizer's special tokens, no chat
 * template), the reply decoded without special tokens. Needs a tokenizer onnxruntime-genai
 * reads (the bundle's tokenizer.json with tokenizer_config.json; byte-level BPE and
 * SentencePiece tokenizers are, word-level ones are not): else LLMX_ERROR_INVALID_ARGUMENT
 * naming the cause. *out_text is caller-owned. */
int llmx_generate_text(llmx_session *session, const char *prompt, const llmx_sampling *params,
                       char **out_text);

/* Free a string the library returned through a char ** out-parameter. NULL is ignored. */
void llmx_free_string(char *s);

/* Close the session and release its buffers. NULL is ignored; closing twice is an error. */
int llmx_close(llmx_session *session);

/* Message of the calling thread's last failed call ("" if none). */
const char *llmx_last_error(void);

/* Fill the first struct_size bytes of *params with defaults and set params->struct_size to
 * struct_size (pass sizeof *params): safe for a struct from any header version. */
void llmx_sampling_init_size(llmx_sampling *params, size_t struct_size);

typedef struct {
    size_t struct_size;          /* sizeof(llmx_open_options); set by llmx_open_options_init_size */
    const char *backend;         /* NULL = "onnxruntime" */
    const char *device;          /* NULL = "cpu" */
    int32_t check_integrity;     /* non-zero: hash every bundle file against its manifest first */
    int32_t threads;             /* CPU threads; 0 = the library's default (every core) */
    /* Speculative decoding is not in this library: the three fields below are checked as before
     * (a bad method, or "draft" without a draft, fails) and generation then decodes plainly,
     * which gives the same tokens, without the speed-up. */
    const char *speculative;     /* NULL = off; "ngram" (prompt lookup) or "draft" (needs draft) */
    int32_t speculative_tokens;  /* proposals verified per call; 0 = the default (5) */
    const char *draft;           /* the draft bundle's directory (speculative "draft"); NULL = none */
} llmx_open_options;

/* Fill the first struct_size bytes of *options with defaults (pass sizeof *options). */
void llmx_open_options_init_size(llmx_open_options *options, size_t struct_size);

/* llmx_open with options (NULL = defaults). With check_integrity, a bundle whose files do not
 * match the sha256 recorded in its manifest.json fails with LLMX_ERROR_BUNDLE naming the file
 * (a folder without a manifest fails too: there is nothing to check against). */
int llmx_open_ex(const char *bundle_dir, const llmx_open_options *options, llmx_session **out);

#ifdef __cplusplus
}
#endif

#endif /* LLMEXPORT_H */
