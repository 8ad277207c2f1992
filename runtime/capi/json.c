/* Just enough JSON reading (json.h): a skipper over values, and lookups built on it. */
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *ws(const char *p) {
    while (p && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* Past the string starting at p (at its opening quote), or NULL. */
static const char *skip_string(const char *p) {
    for (p++; *p; p++) {
        if (*p == '\\') {
            if (!*++p) return NULL;
        } else if (*p == '"') {
            return p + 1;
        }
    }
    return NULL;
}

/* Past the value starting at p (after whitespace), or NULL when malformed. */
static const char *skip(const char *p) {
    p = ws(p);
    if (!p || !*p) return NULL;
    if (*p == '"') return skip_string(p);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = ws(p + 1);
        if (*p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (*p != '"' || !(p = skip_string(p))) return NULL;
                p = ws(p);
                if (*p++ != ':') return NULL;
            }
            if (!(p = ws(skip(p)))) return NULL;
            if (*p == close) return p + 1;
            if (*p++ != ',') return NULL;
            p = ws(p);
        }
    }
    const char *start = p; /* number, true, false, null */
    while (*p && !strchr(",}] \t\r\n", *p)) p++;
    return p > start ? p : NULL;
}

const char *json_member(const char *object, size_t index, char *key, size_t cap) {
    const char *p = ws(object);
    if (!p || *p != '{') return NULL;
    p = ws(p + 1);
    if (*p == '}') return NULL;
    for (size_t i = 0;; i++) {
        if (*p != '"') return NULL;
        const char *name = p;
        if (!(p = skip_string(p))) return NULL;
        const char *colon = ws(p);
        if (*colon != ':') return NULL;
        const char *value = ws(colon + 1);
        if (i == index) {
            if (!json_string(name, key, cap) && cap) key[0] = '\0'; /* too long or escaped: "" */
            return value;
        }
        if (!(p = ws(skip(value)))) return NULL;
        if (*p++ != ',') return NULL;
        p = ws(p);
    }
}

const char *json_item(const char *array, size_t index) {
    const char *p = ws(array);
    if (!p || *p != '[') return NULL;
    p = ws(p + 1);
    if (*p == ']') return NULL;
    for (size_t i = 0;; i++) {
        if (i == index) return p;
        if (!(p = ws(skip(p)))) return NULL;
        if (*p++ != ',') return NULL;
        p = ws(p);
    }
}

const char *json_get(const char *json, const char *path) {
    char want[128], key[128];
    const char *value = ws(json);
    while (value && *path) {
        size_t n = strcspn(path, ".");
        if (n >= sizeof want) return NULL;
        memcpy(want, path, n);
        want[n] = '\0';
        path += n + (path[n] == '.');
        const char *found = NULL;
        for (size_t i = 0; !found; i++) {
            const char *v = json_member(value, i, key, sizeof key);
            if (!v) return NULL;
            if (strcmp(key, want) == 0) found = v;
        }
        value = found;
    }
    return value;
}

int json_number(const char *value, double *out) {
    char *end = NULL;
    value = ws(value);
    if (!value || !(*value == '-' || (*value >= '0' && *value <= '9'))) return 0;
    *out = strtod(value, &end);
    return end != value;
}

int json_string(const char *value, char *out, size_t cap) {
    const char *p = ws(value);
    size_t n = 0;
    if (!p || *p != '"' || cap == 0) return 0;
    for (p++; *p && *p != '"'; p++) {
        char c = *p;
        if (c == '\\') {
            switch (*++p) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case '"': case '\\': case '/': c = *p; break;
            default: return 0; /* \uXXXX: not in the names and paths read here */
            }
        }
        if (n + 1 >= cap) return 0;
        out[n++] = c;
    }
    out[n] = '\0';
    return *p == '"';
}

char *json_read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *text = NULL;
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (size >= 0 && fseek(f, 0, SEEK_SET) == 0 && (text = malloc((size_t)size + 1)) != NULL) {
        if (fread(text, 1, (size_t)size, f) != (size_t)size) {
            free(text);
            text = NULL;
        } else {
            text[size] = '\0';
        }
    }
    fclose(f);
    return text;
}
