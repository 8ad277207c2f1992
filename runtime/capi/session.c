/* llmx_open, llmx_open_ex, llmx_close: options checked, then the bundle loaded (bundle.c) and
 * given a handle (registry.c). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int check_options(const llmx_open_options *o) {
    if (o->backend && strcmp(o->backend, "onnxruntime") != 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open: unknown backend '%s'; this library has one: "
                         "onnxruntime (pass NULL)", o->backend);
    if (o->device && strcmp(o->device, "cpu") != 0 && strcmp(o->device, "cuda") != 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open: unknown device '%s'; devices: cpu, cuda", o->device);
    if (o->threads < 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open_options.threads=%d must be >= 0 (0: default)",
                         o->threads);
    /* Speculative decoding: checked as the Python runtime checks it, then decoded plainly (header). */
    const char *method = o->speculative && *o->speculative ? o->speculative : NULL;
    const char *draft = o->draft && *o->draft ? o->draft : NULL;
    if (method && strcmp(method, "ngram") != 0 && strcmp(method, "draft") != 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open_options: speculative method '%s' is not one of "
                         "ngram, draft", method);
    if (method && strcmp(method, "draft") == 0 && !draft)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open_options: speculative method 'draft' needs a draft "
                         "bundle: set draft to its directory");
    if (!method && draft)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open_options: a draft bundle needs speculative = \"draft\"");
    if (o->speculative_tokens < 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open_options.speculative_tokens=%d must be >= 0 "
                         "(0: the default)", o->speculative_tokens);
    return LLMX_OK;
}

int llmx_open_ex(const char *bundle_dir, const llmx_open_options *given, llmx_session **out) {
    llmx_clear_error();
    if (!bundle_dir || !out)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_open: bundle_dir and out must not be NULL");
    *out = NULL;
    llmx_open_options o;
    int status = llmx_read_open_options(given, &o);
    if (status == LLMX_OK) status = check_options(&o);
    if (status != LLMX_OK) return status;
    session *s = malloc(sizeof *s);
    if (!s) return llmx_fail(LLMX_ERROR_INTERNAL, "llmx_open: out of memory");
    if ((status = llmx_load(bundle_dir, &o, s)) != LLMX_OK) {
        llmx_unload(s);
        free(s);
        return status;
    }
    if ((*out = llmx_register(s)) == NULL) {
        llmx_unload(s);
        free(s);
        return llmx_fail(LLMX_ERROR_INTERNAL, "llmx_open: out of memory");
    }
    return LLMX_OK;
}

int llmx_open(const char *bundle_dir, const char *backend, const char *device, llmx_session **out) {
    llmx_open_options o;
    llmx_open_options_init_size(&o, sizeof o);
    o.backend = backend;
    o.device = device;
    return llmx_open_ex(bundle_dir, &o, out);
}

int llmx_close(llmx_session *handle) {
    llmx_clear_error();
    if (!handle) return LLMX_OK;
    session *s = llmx_unregister(handle); /* waits for calls still running on it */
    if (!s) return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "llmx_close: unknown or already closed session");
    llmx_unload(s);
    free(s);
    return LLMX_OK;
}
