/*
 * Stream a generation from an llmexport bundle to stdout.
 *
 *   generate BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [STOP_AFTER [THREADS]]]
 *
 * TOKEN_IDS is a comma-separated prompt ("1,2,3"). Prints each generated token id as it
 * arrives, then "finish: <reason>". With STOP_AFTER > 0 the callback stops generation after
 * that many tokens; THREADS > 0 sets the CPU threads. The time to the first token and per later
 * token go to stderr. Exit status 1 and the library's message on any error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llmexport.h"

typedef struct {
    int seen;
    int stop_after;
    double first; /* seconds from the start to the first token */
} progress;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int on_token(int32_t token_id, const char *text_delta, void *user_data) {
    progress *p = (progress *)user_data;
    (void)text_delta; /* the token's text: examples/cpp prints it */
    if (p->seen == 0) p->first = now();
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
        fprintf(stderr, "usage: %s BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [STOP_AFTER [THREADS]]]\n", argv[0]);
        return 2;
    }
    int32_t prompt[4096];
    size_t prompt_len = parse_ids(argv[2], prompt, sizeof prompt / sizeof prompt[0]);

    llmx_sampling params;
    llmx_sampling_init(&params);
    params.ignore_eos = 1;
    if (argc > 3) params.max_new_tokens = atoi(argv[3]);
    progress p = {0, argc > 4 ? atoi(argv[4]) : 0, 0.0};

    llmx_open_options options;
    llmx_open_options_init_size(&options, sizeof options);
    options.threads = argc > 5 ? atoi(argv[5]) : 0;
    llmx_session *session = NULL;
    if (llmx_open_ex(argv[1], &options, &session) != LLMX_OK || session == NULL) {
        fprintf(stderr, "error: %s\n", llmx_last_error());
        return 1;
    }
    size_t produced = 0;
    char *reason = NULL;
    double start = now();
    int status = llmx_generate(session, prompt, prompt_len, &params, on_token, &p, NULL, 0, &produced, &reason);
    double end = now();
    if (status != LLMX_OK) {
        fprintf(stderr, "\nerror %d: %s\n", status, llmx_last_error());
        llmx_close(session);
        return 1;
    }
    printf("\nfinish: %s (%zu tokens)\n", reason, produced);
    if (produced > 1)
        fprintf(stderr, "first token %.2f ms, then %.2f ms per token\n", (p.first - start) * 1e3,
                (end - p.first) * 1e3 / (double)(produced - 1));
    llmx_free_string(reason);
    llmx_close(session);
    return 0;
}
