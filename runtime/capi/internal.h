/* What the library's files share: the session record, error reporting, struct reading. */
#ifndef LLMX_INTERNAL_H
#define LLMX_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "llmexport.h"
#include "oga.h"

#ifndef LLMX_VERSION
#define LLMX_VERSION "0.0.0" /* the build passes the package's version */
#endif
#define LLMX_MAX_EOS 16
#define LLMX_MAX_STRUCT_SIZE (64 * 1024)

/* One open bundle: the model (weights and ONNX Runtime session, shared by every generation on
 * it) and what generation needs from genai_config.json. Immutable after open. */
typedef struct {
    OgaModel *model;
    OgaTokenizer *tokenizer;           /* NULL when the bundle has none onnxruntime-genai reads */
    char tokenizer_error[512];         /* why tokenizer is NULL */
    int32_t vocab_size;
    int32_t max_seq_len;               /* tokens a sequence may hold: prompt and output */
    int32_t eos[LLMX_MAX_EOS];
    size_t n_eos;
} session;

/* errors.c: the calling thread's last error. llmx_fail records a message and returns `code`;
 * llmx_oga_fail records onnxruntime-genai's message (and frees `result`). */
void llmx_clear_error(void);
int llmx_fail(int code, const char *format, ...) __attribute__((format(printf, 2, 3)));
int llmx_oga_fail(int code, OgaResult *result, const char *what);
char *llmx_strdup(const char *s); /* malloc'ed copy for the caller (llmx_free_string) */

/* structs.c: the caller's structs, read within their struct_size (the rest take defaults). */
int llmx_read_sampling(const llmx_sampling *given, llmx_sampling *out);
int llmx_read_open_options(const llmx_open_options *given, llmx_open_options *out);

/* registry.c: handles. llmx_acquire finds an open session and counts the caller as its user
 * until llmx_release; llmx_register hands out a new handle; llmx_unregister removes one and
 * waits for its users to finish. */
llmx_session *llmx_register(session *s);
session *llmx_acquire(llmx_session *handle);
void llmx_release(llmx_session *handle);
session *llmx_unregister(llmx_session *handle);

/* bundle.c: open a bundle folder into *s; integrity.c: check its files against manifest.json. */
int llmx_load(const char *dir, const llmx_open_options *options, session *s);
void llmx_unload(session *s);
int llmx_check_integrity(const char *dir);

/* sampling.c: one sequence's sampler (sampling.h). */

#endif /* LLMX_INTERNAL_H */
