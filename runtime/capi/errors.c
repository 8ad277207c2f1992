/* Status codes and the calling thread's last error message; the small plain functions. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static _Thread_local char last_error[2048];

void llmx_clear_error(void) { last_error[0] = '\0'; }

int llmx_fail(int code, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return code;
}

int llmx_oga_fail(int code, OgaResult *result, const char *what) {
    const char *message = result ? OgaResultGetError(result) : NULL;
    llmx_fail(code, "%s: %s", what, message && *message ? message : "onnxruntime-genai failed without a message");
    if (result) OgaDestroyResult(result);
    return code;
}

char *llmx_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, s, n);
    return copy;
}

const char *llmx_last_error(void) { return last_error; }

const char *llmx_version(void) { return LLMX_VERSION; }

void llmx_free_string(char *s) { free(s); }
