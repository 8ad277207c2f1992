/* SHA-256 of a file (what `sha256sum` prints). */
#ifndef LLMX_SHA256_H
#define LLMX_SHA256_H

/* 0 and the 64 hex digits (NUL-terminated) in hex; -1 when the file cannot be read. */
int sha256_file(const char *path, char hex[65]);

#endif /* LLMX_SHA256_H */
