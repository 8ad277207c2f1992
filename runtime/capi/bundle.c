/* Opening a bundle: its genai_config.json (limits, vocabulary, EOS ids), then onnxruntime-genai's
 * model (the ONNX Runtime session over the weights) and, when it can read one, its tokenizer. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "internal.h"
#include "json.h"

static pthread_once_t once = PTHREAD_ONCE_INIT;

static void init_genai(void) {
    OgaSetTelemetryEnabled(false); /* a library inside a service sends nothing anywhere */
}

/* vocab_size, max_seq_len and eos ids from genai_config.json's text. */
static int read_config(const char *dir, const char *text, session *s) {
    double v = 0;
    if (!json_number(json_get(text, "model.vocab_size"), &v) || v < 1)
        return llmx_fail(LLMX_ERROR_BUNDLE, "%s/genai_config.json has no model.vocab_size; re-export the bundle", dir);
    s->vocab_size = (int32_t)v;
    if (!json_number(json_get(text, "search.max_length"), &v) && !json_number(json_get(text, "model.context_length"), &v))
        return llmx_fail(LLMX_ERROR_BUNDLE, "%s/genai_config.json has neither search.max_length nor "
                         "model.context_length; re-export the bundle", dir);
    s->max_seq_len = (int32_t)v;
    const char *eos = json_get(text, "model.eos_token_id"); /* a number or a list of them */
    s->n_eos = 0;
    if (json_number(eos, &v)) {
        s->eos[s->n_eos++] = (int32_t)v;
    } else {
        const char *item;
        for (size_t i = 0; (item = json_item(eos, i)) != NULL && s->n_eos < LLMX_MAX_EOS; i++)
            if (json_number(item, &v)) s->eos[s->n_eos++] = (int32_t)v;
    }
    return LLMX_OK;
}

/* ONNX Runtime settings through genai's config overlay: the device and the thread count. */
static int configure(OgaConfig *config, const llmx_open_options *o) {
    OgaResult *r = OgaConfigClearProviders(config); /* the CPU */
    if (!r && o->device && strcmp(o->device, "cuda") == 0) r = OgaConfigAppendProvider(config, "cuda");
    if (r) return llmx_oga_fail(LLMX_ERROR_BUNDLE, r, "choosing the device");
    if (o->threads > 0) {
        char overlay[256];
        snprintf(overlay, sizeof overlay, "{\"model\": {\"decoder\": {\"session_options\": "
                 "{\"intra_op_num_threads\": %d, \"inter_op_num_threads\": 1}}}}", o->threads);
        if ((r = OgaConfigOverlay(config, overlay)) != NULL)
            return llmx_oga_fail(LLMX_ERROR_INTERNAL, r, "setting the thread count");
    }
    return LLMX_OK;
}

int llmx_load(const char *dir, const llmx_open_options *options, session *s) {
    struct stat st;
    char path[4096];
    memset(s, 0, sizeof *s);
    pthread_once(&once, init_genai);
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s does not exist (or is not a directory); export one with "
                         "`llmexport onnx --target ort`", dir);
    if (options->check_integrity && llmx_check_integrity(dir) != LLMX_OK) return LLMX_ERROR_BUNDLE;
    snprintf(path, sizeof path, "%s/genai_config.json", dir);
    char *text = json_read_file(path);
    if (!text)
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s has no genai_config.json, so onnxruntime-genai cannot run it; "
                         "re-export it with `llmexport onnx --target ort` (which writes one)", dir);
    int status = read_config(dir, text, s);
    free(text);
    if (status != LLMX_OK) return status;

    OgaConfig *config = NULL;
    OgaResult *r = OgaCreateConfig(dir, &config);
    if (r) return llmx_oga_fail(LLMX_ERROR_BUNDLE, r, "reading genai_config.json");
    status = configure(config, options);
    if (status == LLMX_OK && (r = OgaCreateModelFromConfig(config, &s->model)) != NULL)
        status = llmx_oga_fail(LLMX_ERROR_BUNDLE, r, "loading the model");
    OgaDestroyConfig(config);
    if (status != LLMX_OK) return status;

    if ((r = OgaCreateTokenizer(s->model, &s->tokenizer)) != NULL) { /* fine: token ids in and out */
        snprintf(s->tokenizer_error, sizeof s->tokenizer_error, "%s", OgaResultGetError(r));
        OgaDestroyResult(r);
        s->tokenizer = NULL;
    }
    return LLMX_OK;
}

void llmx_unload(session *s) {
    if (s->tokenizer) OgaDestroyTokenizer(s->tokenizer);
    if (s->model) OgaDestroyModel(s->model);
    s->tokenizer = NULL;
    s->model = NULL;
}
