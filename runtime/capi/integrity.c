/* check_integrity: every file in manifest.json's integrity record against its recorded size and
 * whole-file sha256 (runtime/bundle/integrity.py writes the record). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "internal.h"
#include "json.h"
#include "sha256.h"

static int check_file(const char *dir, const char *name, const char *entry) {
    char path[4096], want[80], got[65];
    double bytes = -1;
    struct stat st;
    if (!*name || !json_string(json_get(entry, "sha256"), want, sizeof want) ||
        !json_number(json_get(entry, "bytes"), &bytes))
        return llmx_fail(LLMX_ERROR_BUNDLE, "%s/manifest.json: integrity entry for '%s' is malformed; re-export the "
                         "bundle", dir, name);
    if (strstr(name, "..") || name[0] == '/')
        return llmx_fail(LLMX_ERROR_BUNDLE, "%s/manifest.json names '%s', outside the bundle", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (stat(path, &st) != 0)
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s: %s is missing; re-export the bundle", dir, name);
    if ((double)st.st_size != bytes)
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s: %s has %lld bytes, the manifest records %.0f; re-export the "
                         "bundle", dir, name, (long long)st.st_size, bytes);
    if (sha256_file(path, got) != 0)
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s: cannot read %s", dir, name);
    if (strcmp(got, want) != 0)
        return llmx_fail(LLMX_ERROR_BUNDLE, "bundle %s: %s sha256 mismatch (recorded %s, found %s): the file is "
                         "damaged; re-export or re-copy the bundle", dir, name, want, got);
    return LLMX_OK;
}

int llmx_check_integrity(const char *dir) {
    char path[4096], name[1024];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    char *manifest = json_read_file(path);
    if (!manifest)
        return llmx_fail(LLMX_ERROR_BUNDLE, "check_integrity: %s has no manifest.json to check its files against",
                         dir);
    const char *files = json_get(manifest, "integrity.files"), *entry;
    int status = files ? LLMX_OK
                       : llmx_fail(LLMX_ERROR_BUNDLE, "check_integrity: %s/manifest.json has no integrity record; "
                                   "re-export the bundle", dir);
    for (size_t i = 0; status == LLMX_OK && (entry = json_member(files, i, name, sizeof name)) != NULL; i++)
        status = check_file(dir, name, entry);
    free(manifest);
    return status;
}
