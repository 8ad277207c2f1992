/* Error paths of the C API, and 1,000 open/close cycles with RSS measured.
 * usage: errors BUNDLE_DIR BUNDLE_WITH_AN_UNREADABLE_TOKENIZER BUNDLE_WITHOUT_GENAI_CONFIG ; prints
 * "name status ..." lines the test reads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llmexport.h"

static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) { if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0; fclose(f); }
    return resident * 4;
}

static void report(const char *name, int status) {
    printf("%s %d %s\n", name, status, llmx_last_error());
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    llmx_session *s = NULL;
    int32_t prompt[3] = {5, 6, 7};
    int32_t out[8];
    size_t n = 0;
    llmx_sampling params;

    report("missing_bundle", llmx_open("/no/such/bundle", NULL, NULL, &s));
    printf("missing_bundle_handle_null %d\n", s == NULL);
    report("null_out", llmx_open(argv[1], NULL, NULL, NULL));
    report("bad_backend", llmx_open(argv[1], "nope", NULL, &s));
    report("no_genai_config", llmx_open(argv[3], NULL, NULL, &s));

    if (llmx_open(argv[1], NULL, NULL, &s) != LLMX_OK) { report("open", 1); return 1; }
    llmx_sampling_init(&params);
    params.temperature = -1.0f;
    report("bad_temperature", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL));
    llmx_sampling_init(&params);
    params.top_p = 1.5f;
    report("bad_top_p", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL));
    llmx_sampling_init(&params);
    params.struct_size = 4;
    report("uninitialised_params", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL));
    llmx_sampling_init(&params);
    int32_t bad_token[1] = {100000};
    report("bad_token", llmx_generate(s, bad_token, 1, &params, NULL, NULL, out, 8, &n, NULL));
    report("null_prompt", llmx_generate(s, NULL, 3, &params, NULL, NULL, out, 8, &n, NULL));
    int32_t *long_prompt = calloc(100000, sizeof(int32_t));
    report("prompt_too_long", llmx_generate(s, long_prompt, 100000, &params, NULL, NULL, out, 8, &n, NULL));
    free(long_prompt);
    params.max_new_tokens = 1000; /* past max_seq_len: stops cleanly with a reason */
    params.ignore_eos = 1;
    char *reason = NULL;
    report("past_max_len", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, &reason));
    printf("past_max_len_reason %s %zu\n", reason ? reason : "(null)", n);
    llmx_free_string(reason);
    char *text = NULL;
    llmx_sampling_init(&params);
    params.max_new_tokens = 6;
    params.ignore_eos = 1;
    report("generate_text", llmx_generate_text(s, "hf", &params, &text));
    printf("generate_text_result "); /* as hex: the tiny model's bytes may be anything */
    for (const char *c = text ? text : ""; *c; c++) printf("%02x", (unsigned char)*c);
    printf("\n");
    llmx_free_string(text);
    llmx_session *plain = NULL;
    report("open_unreadable_tokenizer", llmx_open(argv[2], NULL, NULL, &plain));
    report("text_without_tokenizer", llmx_generate_text(plain, "hello", &params, &text));
    llmx_close(plain);
    llmx_sampling_init(&params);
    params.max_new_tokens = 4;
    report("still_usable", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL));
    printf("still_usable_tokens %zu\n", n);
    /* Sampling: a seed reproduces its tokens; top_k = 1 is greedy at any temperature. */
    int32_t a[12], b[12], greedy[12], top1[12];
    size_t na = 0, nb = 0, ng = 0, n1 = 0;
    llmx_sampling_init(&params);
    params.max_new_tokens = 12;
    params.ignore_eos = 1;
    llmx_generate(s, prompt, 3, &params, NULL, NULL, greedy, 12, &ng, NULL);
    params.temperature = 1.0f;
    params.top_k = 1;
    llmx_generate(s, prompt, 3, &params, NULL, NULL, top1, 12, &n1, NULL);
    params.top_k = 50;
    params.top_p = 0.9f;
    params.repetition_penalty = 1.1f;
    params.seed = 3;
    llmx_generate(s, prompt, 3, &params, NULL, NULL, a, 12, &na, NULL);
    llmx_generate(s, prompt, 3, &params, NULL, NULL, b, 12, &nb, NULL);
    printf("seed_reproduces %d\n", na == 12 && nb == 12 && memcmp(a, b, sizeof a) == 0);
    printf("top_k_1_is_greedy %d\n", ng == 12 && n1 == 12 && memcmp(greedy, top1, sizeof greedy) == 0);
    report("close", llmx_close(s));
    report("close_twice", llmx_close(s));
    report("generate_after_close", llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL));

    /* Warm up, then 1,000 open/generate/close cycles: RSS must stay flat. */
    for (int i = 0; i < 20; i++) {
        llmx_open(argv[1], NULL, NULL, &s);
        llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL);
        llmx_close(s);
    }
    long before = rss_kib();
    int failures = 0;
    for (int i = 0; i < 1000; i++) {
        failures += llmx_open(argv[1], NULL, NULL, &s) != LLMX_OK;
        failures += llmx_generate(s, prompt, 3, &params, NULL, NULL, out, 8, &n, NULL) != LLMX_OK;
        failures += llmx_close(s) != LLMX_OK;
        failures += llmx_open("/no/such/bundle", NULL, NULL, &s) == LLMX_OK;
    }
    printf("cycles_failures %d\n", failures);
    printf("rss_kib_before %ld\nrss_kib_after %ld\n", before, rss_kib());
    return 0;
}
