/* The caller's structs: defaults, filling within a given size, reading within struct_size and
 * checking values. A caller compiled against an older header has a smaller struct: nothing is
 * read or written past the struct_size it gives. */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "internal.h"

/* The first published llmx_sampling ends with ignore_eos: llmx_sampling_init fills exactly that. */
#define SAMPLING_V0_SIZE (offsetof(llmx_sampling, ignore_eos) + sizeof(int32_t))

static const llmx_sampling sampling_defaults = {
    .struct_size = sizeof(llmx_sampling), .max_new_tokens = 64, .temperature = 0.0f, .top_k = 0, .top_p = 1.0f,
    .repetition_penalty = 1.0f, .seed = 0, .ignore_eos = 0,
};

static const llmx_open_options open_defaults = {.struct_size = sizeof(llmx_open_options)}; /* NULLs and zeros */

/* Copy the fields of `defaults` that lie entirely within `size` bytes to `dst`, and set its
 * struct_size; a size too small for struct_size itself writes nothing. */
static void fill(void *dst, const void *defaults, size_t full, size_t size, const size_t *ends, size_t n) {
    if (!dst || size < sizeof(size_t)) return;
    if (size > full) size = full;
    *(size_t *)dst = size;
    size_t start = sizeof(size_t);
    for (size_t i = 0; i < n && ends[i] <= size; i++) { /* ends: each field's end, in order */
        memcpy((char *)dst + start, (const char *)defaults + start, ends[i] - start);
        start = ends[i];
    }
}

#define END(type, field) (offsetof(type, field) + sizeof(((type *)0)->field))

static const size_t sampling_ends[] = {
    END(llmx_sampling, max_new_tokens), END(llmx_sampling, temperature), END(llmx_sampling, top_k),
    END(llmx_sampling, top_p), END(llmx_sampling, repetition_penalty), END(llmx_sampling, seed),
    END(llmx_sampling, ignore_eos),
};

static const size_t options_ends[] = {
    END(llmx_open_options, backend), END(llmx_open_options, device), END(llmx_open_options, check_integrity),
    END(llmx_open_options, threads), END(llmx_open_options, speculative),
    END(llmx_open_options, speculative_tokens), END(llmx_open_options, draft),
};

void llmx_sampling_init(llmx_sampling *params) {
    fill(params, &sampling_defaults, sizeof *params, SAMPLING_V0_SIZE, sampling_ends,
         sizeof sampling_ends / sizeof *sampling_ends);
}

void llmx_sampling_init_size(llmx_sampling *params, size_t struct_size) {
    fill(params, &sampling_defaults, sizeof *params, struct_size, sampling_ends,
         sizeof sampling_ends / sizeof *sampling_ends);
}

void llmx_open_options_init_size(llmx_open_options *options, size_t struct_size) {
    fill(options, &open_defaults, sizeof *options, struct_size, options_ends,
         sizeof options_ends / sizeof *options_ends);
}

/* Read `given` (the caller's, struct_size bytes) into the full struct `out` (defaults first). */
static int read_struct(const void *given, void *out, const void *defaults, size_t full, size_t first_end,
                       const size_t *ends, size_t n, const char *name) {
    memcpy(out, defaults, full);
    if (!given) return LLMX_OK;
    size_t size = *(const size_t *)given;
    if (size < first_end || size > LLMX_MAX_STRUCT_SIZE)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "%s.struct_size=%zu is not a struct size; set it with "
                         "%s_init_size(p, sizeof *p)", name, size, name);
    size_t start = sizeof(size_t);
    for (size_t i = 0; i < n && ends[i] <= size; i++) {
        memcpy((char *)out + start, (const char *)given + start, ends[i] - start);
        start = ends[i];
    }
    return LLMX_OK;
}

int llmx_read_sampling(const llmx_sampling *given, llmx_sampling *p) {
    int status = read_struct(given, p, &sampling_defaults, sizeof *p, sampling_ends[0], sampling_ends,
                      sizeof sampling_ends / sizeof *sampling_ends, "llmx_sampling");
    if (status != LLMX_OK) return status;
    if (p->max_new_tokens < 1)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "max_new_tokens=%d must be at least 1", p->max_new_tokens);
    if (!(p->temperature >= 0) || isinf(p->temperature))
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "temperature=%g must be >= 0 (0 is greedy)", p->temperature);
    if (p->top_k < 0)
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "top_k=%d must be >= 0 (0 turns it off)", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "top_p=%g must be in (0, 1]", p->top_p);
    if (p->seed >= (UINT64_C(1) << 63))
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "seed=%llu must be an integer in 0..2**63-1",
                         (unsigned long long)p->seed);
    if (!(p->repetition_penalty > 0) || isinf(p->repetition_penalty))
        return llmx_fail(LLMX_ERROR_INVALID_ARGUMENT, "repetition_penalty=%g must be > 0 (1 is off)",
                         p->repetition_penalty);
    return LLMX_OK;
}

int llmx_read_open_options(const llmx_open_options *given, llmx_open_options *o) {
    return read_struct(given, o, &open_defaults, sizeof *o, options_ends[0], options_ends,
                sizeof options_ends / sizeof *options_ends, "llmx_open_options");
}
