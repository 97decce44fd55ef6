/* Shared by the test programs: a check that fails the program with a line the Rust test
 * reads ("BAD line N: ..." and exit code 3), and the per-seed data pattern every program
 * writes and verifies. */
#ifndef USM_TEST_CHECK_H
#define USM_TEST_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            printf("BAD line %d: ", __LINE__);                                           \
            printf(__VA_ARGS__);                                                         \
            printf("\n");                                                                \
            fflush(stdout);                                                              \
            exit(3);                                                                     \
        }                                                                                \
    } while (0)

static inline uint64_t val(uint64_t seed, size_t i) { return seed * 0x9E3779B97F4A7C15ULL + i; }

static inline void fill(void *p, size_t len, uint64_t seed) {
    uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++) w[i] = val(seed, i);
}

/* Index of the first wrong word, or -1. */
static inline long verify(const void *p, size_t len, uint64_t seed) {
    const uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++)
        if (w[i] != val(seed, i)) return (long)i;
    return -1;
}

/* This process's resident anonymous memory (RssAnon), in KiB; -1 if unreadable. */
static inline long rss_anon_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "RssAnon: %ld kB", &kb) == 1) break;
    fclose(f);
    return kb;
}

#endif
