/* Session handles. A handle is a number, never a pointer into freed memory: a closed or unknown
 * handle is found missing (LLMX_ERROR_INVALID_ARGUMENT), not dereferenced, and a new session
 * never reuses an old handle. Each entry counts the calls running on it so that close waits. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    uintptr_t id;
    session *s;
    int users;
    int closing; /* llmx_close has begun: no new calls */
} entry;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle = PTHREAD_COND_INITIALIZER;
static entry *entries;
static size_t count, capacity;
static uintptr_t next_id = 1;

static entry *find(llmx_session *handle) {
    for (size_t i = 0; i < count; i++)
        if (entries[i].id == (uintptr_t)handle) return &entries[i];
    return NULL;
}

llmx_session *llmx_register(session *s) {
    llmx_session *handle = NULL;
    pthread_mutex_lock(&lock);
    if (count == capacity) {
        size_t grown = capacity ? 2 * capacity : 8;
        entry *bigger = realloc(entries, grown * sizeof *entries);
        if (bigger) entries = bigger, capacity = grown;
    }
    if (count < capacity) {
        entries[count++] = (entry){next_id, s, 0, 0};
        handle = (llmx_session *)next_id++;
    }
    pthread_mutex_unlock(&lock);
    return handle;
}

session *llmx_acquire(llmx_session *handle) {
    pthread_mutex_lock(&lock);
    entry *e = find(handle);
    session *s = e && !e->closing ? (e->users++, e->s) : NULL;
    pthread_mutex_unlock(&lock);
    return s;
}

void llmx_release(llmx_session *handle) {
    pthread_mutex_lock(&lock);
    entry *e = find(handle);
    if (e) e->users--;
    pthread_cond_broadcast(&idle);
    pthread_mutex_unlock(&lock);
}

session *llmx_unregister(llmx_session *handle) {
    pthread_mutex_lock(&lock);
    entry *e = find(handle);
    session *s = NULL;
    if (e && !e->closing) {
        e->closing = 1;
        while ((e = find(handle))->users > 0) pthread_cond_wait(&idle, &lock); /* entries move: find again */
        s = e->s;
        *e = entries[--count];
    }
    pthread_mutex_unlock(&lock);
    return s;
}
