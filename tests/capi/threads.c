/* Two threads generating at the same time, on two sessions or on one shared session.
 * usage: threads BUNDLE_DIR [shared] ; prints each thread's tokens ("thread I: ids"). */
#include <pthread.h>
#include <stdio.h>

#include "llmexport.h"

typedef struct {
    const char *bundle;
    llmx_session *shared; /* NULL: the thread opens its own */
    int32_t prompt[3];
    int32_t out[32];
    size_t n;
    int status;
} job;

static void *run(void *arg) {
    job *j = (job *)arg;
    llmx_session *s = NULL;
    llmx_sampling params;
    llmx_sampling_init(&params);
    params.max_new_tokens = 16;
    params.ignore_eos = 1;
    j->status = j->shared ? LLMX_OK : llmx_open(j->bundle, NULL, NULL, &s);
    if (j->shared) s = j->shared;
    for (int repeat = 0; repeat < 5 && j->status == LLMX_OK; repeat++)
        j->status = llmx_generate(s, j->prompt, 3, &params, NULL, NULL, j->out, 32, &j->n, NULL);
    if (!j->shared) llmx_close(s);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    llmx_session *shared = NULL;
    if (argc > 2 && llmx_open(argv[1], NULL, NULL, &shared) != LLMX_OK) return 3;
    job jobs[2] = {{argv[1], shared, {5, 6, 7}, {0}, 0, -1}, {argv[1], shared, {9, 10, 11}, {0}, 0, -1}};
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, run, &jobs[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 2; i++) {
        printf("thread %d status %d:", i, jobs[i].status);
        for (size_t t = 0; t < jobs[i].n; t++) printf(" %d", jobs[i].out[t]);
        printf("\n");
    }
    llmx_close(shared);
    return 0;
}
