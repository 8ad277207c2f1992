/* One sequence's sampler (sampling.h). V: the vocabulary size; every array here is (V,). */
#include "sampling.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FLOOR 80.0f /* a token this many nats below the top keeps weight e^-80: no denormals */
#define NEAR 16.0f  /* top-p sorts only the tokens this close to the top when they hold the mass */

typedef struct {
    float p;
    int32_t id;
} candidate;

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static double uniform(uint64_t s[4]) { /* xoshiro256**, in [0, 1) */
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

int sampler_init(sampler *s, const llmx_sampling *params, int32_t vocab, const int32_t *prompt, size_t n) {
    memset(s, 0, sizeof *s);
    s->params = *params;
    s->vocab = vocab;
    uint64_t state = params->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&state);
    if (params->repetition_penalty != 1.0f) {
        if (!(s->seen = calloc((size_t)vocab, 1))) return -1;
        for (size_t i = 0; i < n; i++)
            if (prompt[i] >= 0 && prompt[i] < vocab) s->seen[prompt[i]] = 1;
    }
    if ((params->temperature > 0 || s->seen) && !(s->x = malloc((size_t)vocab * sizeof *s->x))) return -1;
    if (params->temperature > 0 && !(s->order = malloc((size_t)vocab * sizeof(candidate)))) return -1;
    return 0;
}

void sampler_free(sampler *s) {
    free(s->seen);
    free(s->x);
    free(s->order);
    memset(s, 0, sizeof *s);
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int by_weight(const void *a, const void *b) { /* most likely first; ties by id, as a stable sort */
    const candidate *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The k-th largest of x (max 0): the values within a gap of the top, the gap doubled from 1/4 nat
 * until k are inside, sorted. */
static float kth_largest(const float *x, int32_t n, int32_t k, candidate *scratch) {
    int32_t m = 0;
    for (float gap = 0.25f;; gap *= 2) {
        m = 0;
        for (int32_t i = 0; i < n; i++)
            if (x[i] >= -gap || gap >= 2 * FLOOR) scratch[m++] = (candidate){x[i], i};
        if (m >= k) break;
    }
    qsort(scratch, (size_t)m, sizeof *scratch, by_weight);
    return scratch[k - 1].p;
}

/* A draw from weights w (V,; the top token's is 1) limited to the top-p nucleus: the most likely
 * tokens, in a stable sort's order, while the mass before each is under top_p of the total. Only
 * the tokens within NEAR nats of the top are sorted when they hold that mass (the usual case). */
static int32_t draw_nucleus(sampler *s, const float *w, double total) {
    candidate *c = (candidate *)s->order;
    const float near_weight = expf(-NEAR);
    double near = 0, target = s->params.top_p * total;
    for (int32_t i = 0; i < s->vocab; i++)
        if (w[i] >= near_weight) near += w[i];
    int32_t n = 0;
    for (int32_t i = 0; i < s->vocab; i++)
        if (w[i] > 0 && (near < target || w[i] >= near_weight)) c[n++] = (candidate){w[i], i};
    qsort(c, (size_t)n, sizeof *c, by_weight);
    double kept = 0;
    int32_t m = 0;
    while (m < n && kept < target) kept += c[m++].p;
    double u = uniform(s->rng) * kept, sum = 0;
    for (int32_t i = 0; i < m; i++)
        if ((sum += c[i].p) > u) return c[i].id;
    return c[m - 1].id;
}

int32_t sampler_next(sampler *s, const float *logits) {
    const llmx_sampling *p = &s->params;
    const int32_t V = s->vocab;
    int32_t token;
    if (p->temperature == 0 && !s->seen) {
        token = argmax(logits, V);
    } else {
        float *x = s->x, inv = (float)(1.0 / (p->temperature > 0 ? (double)p->temperature : 1.0));
        for (int32_t i = 0; i < V; i++) x[i] = logits[i] * inv;
        if (s->seen) /* temperature first is the same as after: both keep the sign and scale */
            for (int32_t i = 0; i < V; i++)
                if (s->seen[i]) x[i] = x[i] > 0 ? x[i] / p->repetition_penalty : x[i] * p->repetition_penalty;
        if (p->temperature == 0) {
            token = argmax(x, V);
        } else {
            float top = x[argmax(x, V)];
            for (int32_t i = 0; i < V; i++) x[i] = fmaxf(x[i] - top, -FLOOR);
            float cut = p->top_k > 0 && p->top_k < V ? kth_largest(x, V, p->top_k, (candidate *)s->order) : -INFINITY;
            double total = 0;
            for (int32_t i = 0; i < V; i++) total += (x[i] = x[i] < cut ? 0.0f : expf(x[i])); /* weights */
            if (p->top_p < 1.0f) {
                token = draw_nucleus(s, x, total);
            } else {
                double u = uniform(s->rng) * total, sum = 0;
                token = V - 1;
                for (int32_t i = 0; i < V; i++)
                    if ((sum += x[i]) > u) { token = i; break; }
            }
        }
    }
    if (s->seen && token >= 0 && token < V) s->seen[token] = 1;
    return token;
}
