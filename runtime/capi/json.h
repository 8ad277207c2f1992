/*
 * Just enough JSON reading for genai_config.json and manifest.json: find a value by a dotted path
 * of object keys, walk an object's members or an array's items, read a number or a string. Values
 * are pointers into the NUL-terminated text; nothing is allocated. Malformed text reads as absent.
 */
#ifndef LLMX_JSON_H
#define LLMX_JSON_H

#include <stddef.h>

/* The value at `path` ("model.vocab_size"; keys separated by dots) in `json`, or NULL. */
const char *json_get(const char *json, const char *path);

/* The index-th member's value of the object at `object` (its key copied into key[cap]; "" when
 * it does not fit or has \u escapes), or NULL past the last member or when `object` is not an object. */
const char *json_member(const char *object, size_t index, char *key, size_t cap);

/* The index-th item of the array at `array`, or NULL past the last item or when not an array. */
const char *json_item(const char *array, size_t index);

/* 1 and *out when `value` is a number, else 0. */
int json_number(const char *value, double *out);

/* 1 and the unescaped string in out[cap] (NUL-terminated) when `value` is a string that fits, else 0. */
int json_string(const char *value, char *out, size_t cap);

/* The text of the file at `path` (NUL-terminated, caller frees), or NULL. */
char *json_read_file(const char *path);

#endif /* LLMX_JSON_H */
