/*
 * One sequence's sampler over a row of float logits, in the Python runtime's order
 * (runtime/sampling.py): repetition penalty on every token seen (prompt included;
 * transformers' definition), temperature, then top-k and top-p; greedy is an argmax (the first
 * of equal maxima, as numpy's). Draws come from xoshiro256** seeded by the seed, so a seed
 * reproduces its stream here, though not numpy's.
 */
#ifndef LLMX_SAMPLING_H
#define LLMX_SAMPLING_H

#include <stddef.h>
#include <stdint.h>

#include "llmexport.h"

typedef struct {
    llmx_sampling params;
    int32_t vocab;
    uint8_t *seen;       /* vocab flags: the token was in the prompt or output (repetition penalty) */
    float *x;            /* vocab scratch */
    int32_t *order;      /* vocab scratch: candidates for top-p */
    uint64_t rng[4];
} sampler;

/* 0 on success; -1 when out of memory. */
int sampler_init(sampler *s, const llmx_sampling *params, int32_t vocab, const int32_t *prompt, size_t n);
void sampler_free(sampler *s);
/* The next token from `logits` (vocab floats, left unchanged); records it as seen. */
int32_t sampler_next(sampler *s, const float *logits);

#endif /* LLMX_SAMPLING_H */
