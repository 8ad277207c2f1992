/* Speculative decoding through llmx_open_options.
 * usage: speculative BUNDLE_DIR ; prints "name status [tokens...]" lines the test reads. */
#include <stdio.h>
#include <string.h>

#include "llmexport.h"

static void generate(const char *name, const char *bundle, const char *method, const char *draft) {
    llmx_open_options options;
    llmx_open_options_init_size(&options, sizeof options);
    options.speculative = method;
    options.speculative_tokens = 4;
    options.draft = draft;
    llmx_session *s = NULL;
    int status = llmx_open_ex(bundle, &options, &s);
    if (status != LLMX_OK) {
        printf("%s %d %s\n", name, status, llmx_last_error());
        return;
    }
    int32_t prompt[19] = {5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7};
    int32_t out[24];
    size_t n = 0;
    llmx_sampling params;
    llmx_sampling_init_size(&params, sizeof params);
    params.max_new_tokens = 24;
    params.ignore_eos = 1;
    status = llmx_generate(s, prompt, 19, &params, NULL, NULL, out, 24, &n, NULL);
    printf("%s %d", name, status);
    for (size_t i = 0; i < n; i++) printf(" %d", out[i]);
    printf("\n");
    llmx_close(s);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    generate("plain", argv[1], NULL, NULL);
    generate("ngram", argv[1], "ngram", NULL);
    generate("draft", argv[1], "draft", argv[1]);
    generate("bad_method", argv[1], "medusa", NULL);
    generate("draft_without_bundle", argv[1], "draft", NULL);
    return 0;
}
