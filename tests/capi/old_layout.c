/* A caller compiled against an older, smaller llmx_sampling / llmx_open_options: the library
 * must neither write past the caller's struct nor read fields the caller does not have. */
#include <stdio.h>
#include <string.h>

#include "llmexport.h"

/* What an older header declared: the fields up to top_k only, and options without threads. */
typedef struct {
    size_t struct_size;
    int32_t max_new_tokens;
    float temperature;
    int32_t top_k;
} old_sampling;

typedef struct {
    size_t struct_size;
    const char *backend;
    const char *device;
} old_open_options;

static int intact(const unsigned char *guard, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (guard[i] != 0xAB) return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct { old_sampling s; unsigned char guard[64]; } box;
    memset(&box, 0xAB, sizeof box);
    llmx_sampling_init_size((llmx_sampling *)&box.s, sizeof box.s);
    printf("sampling_size %zu %d\n", box.s.struct_size, sizeof box.s == box.s.struct_size);
    printf("sampling_guard %d\n", intact(box.guard, sizeof box.guard));
    printf("sampling_defaults %d %g %d\n", box.s.max_new_tokens, box.s.temperature, box.s.top_k);

    struct { old_open_options o; unsigned char guard[64]; } ob;
    memset(&ob, 0xAB, sizeof ob);
    llmx_open_options_init_size((llmx_open_options *)&ob.o, sizeof ob.o);
    printf("options_guard %d\n", intact(ob.guard, sizeof ob.guard));
    llmx_session *s = NULL;
    printf("open_old %d\n", llmx_open_ex(argv[1], (const llmx_open_options *)&ob.o, &s));

    box.s.max_new_tokens = 5;
    int32_t prompt[3] = {5, 6, 7}, out[16];
    size_t n = 0;
    int status = llmx_generate(s, prompt, 3, (const llmx_sampling *)&box.s, NULL, NULL, out, 16, &n, NULL);
    printf("generate_old %d", status);
    for (size_t i = 0; i < n && i < 16; i++) printf(" %d", out[i]);
    printf("\n");
    llmx_close(s);

    llmx_open_options full;
    llmx_open_options_init_size(&full, sizeof full);
    full.check_integrity = 1;
    llmx_session *damaged = NULL;
    status = llmx_open_ex(argv[2], &full, &damaged);
    printf("open_damaged %d %d %s\n", status, damaged == NULL, llmx_last_error());
    llmx_session *intact = NULL;
    printf("open_intact %d\n", llmx_open_ex(argv[1], &full, &intact));
    llmx_close(intact);
    full.threads = -1;
    printf("bad_threads %d\n", llmx_open_ex(argv[1], &full, &damaged));
    return 0;
}
