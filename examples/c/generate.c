/*
 * Stream a generation from an llmexport bundle to stdout.
 *
 *   generate BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [STOP_AFTER]]
 *
 * TOKEN_IDS is a comma-separated prompt ("1,2,3"). Prints each generated token id as it
 * arrives, then "finish: <reason>". With STOP_AFTER > 0 the callback stops generation after
 * that many tokens. Exit status 1 and the library's message on any error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llmexport.h"

typedef struct {
    int seen;
    int stop_after;
} progress;

static int on_token(int32_t token_id, const char *text_delta, void *user_data) {
    progress *p = (progress *)user_data;
    (void)text_delta; /* the tiny test bundles have no tokenizer; real ones stream text here */
    printf("%s%d", p->seen ? " " : "", token_id);
    fflush(stdout);
    p->seen++;
    return p->stop_after > 0 && p->seen >= p->stop_after; /* non-zero stops generation */
}

static size_t parse_ids(const char *text, int32_t *ids, size_t capacity) {
    size_t n = 0;
    char *copy = strdup(text), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok && n < capacity; tok = strtok_r(NULL, ",", &save))
        ids[n++] = (int32_t)strtol(tok, NULL, 10);
    free(copy);
    return n;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [STOP_AFTER]]\n", argv[0]);
        return 2;
    }
    int32_t prompt[4096];
    size_t prompt_len = parse_ids(argv[2], prompt, sizeof prompt / sizeof prompt[0]);

    llmx_sampling params;
    llmx_sampling_init(&params);
    params.ignore_eos = 1;
    if (argc > 3) params.max_new_tokens = atoi(argv[3]);
    progress p = {0, argc > 4 ? atoi(argv[4]) : 0};

    llmx_session *session = NULL;
    if (llmx_open(argv[1], NULL, "cpu", &session) != LLMX_OK || session == NULL) {
        fprintf(stderr, "error: %s\n", llmx_last_error());
        return 1;
    }
    size_t produced = 0;
    char *reason = NULL;
    int status = llmx_generate(session, prompt, prompt_len, &params, on_token, &p, NULL, 0, &produced, &reason);
    if (status != LLMX_OK) {
        fprintf(stderr, "\nerror %d: %s\n", status, llmx_last_error());
        llmx_close(session);
        return 1;
    }
    printf("\nfinish: %s (%zu tokens)\n", reason, produced);
    llmx_free_string(reason);
    llmx_close(session);
    return 0;
}
