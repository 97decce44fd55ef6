/* A hot set that fits in the pool, touched again between every few pages of a cold stream
 * several times the pool that is written once: the workload access sampling is for. An
 * eviction policy that knows which pages are used (clock with re-fault sampling) keeps
 * the hot set in memory and evicts the stream; one that does not (fifo) evicts the hot
 * set every time the stream has gone once through the pool, and reads it back from swap.
 *
 *   hot_cold HOT_MIB COLD_MIB CHUNK_PAGES
 *
 * 1. Writes every hot page (a per-page pattern, its last word a pass counter).
 * 2. Streams: writes each cold page once (a per-page pattern); after every CHUNK_PAGES
 *    cold pages, reads every hot page whole (verified: pattern and pass counter) and
 *    bumps its pass counter.
 * 3. Prints "STREAMED passes=N" and waits for SIGUSR1 (the test reads the daemon's
 *    counters meanwhile: until here, only hot pages were ever read back from swap).
 * 4. Verifies every cold page and every hot page, prints "OK", exit 0. A wrong word
 *    prints "BAD line N: ..." and exits 3. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "check.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define HOT_SEED 0x1000000UL
#define COLD_SEED 0x9000000UL

static char *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "mmap of %zu bytes failed", len);
    return p;
}

/* Hot page i: the pattern of seed HOT_SEED + i but its last word, which holds `pass`. */
static void hot_check(const char *hot, size_t i, uint64_t pass) {
    const uint64_t *w = (const uint64_t *)(hot + i * PAGE);
    for (size_t k = 0; k + 1 < WORDS; k++)
        CHECK(w[k] == val(HOT_SEED + i, k), "hot page %zu word %zu: %#lx, want %#lx (pass %lu)",
              i, k, (unsigned long)w[k], (unsigned long)val(HOT_SEED + i, k),
              (unsigned long)pass);
    CHECK(w[WORDS - 1] == pass, "hot page %zu pass counter %lu, want %lu", i,
          (unsigned long)w[WORDS - 1], (unsigned long)pass);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOT_MIB COLD_MIB CHUNK_PAGES\n", argv[0]);
        return 2;
    }
    size_t hot_pages = strtoul(argv[1], NULL, 10) * 256;
    size_t cold_pages = strtoul(argv[2], NULL, 10) * 256;
    size_t chunk = strtoul(argv[3], NULL, 10);
    CHECK(hot_pages > 0 && cold_pages > 0 && chunk > 0, "bad arguments");
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    CHECK(sigprocmask(SIG_BLOCK, &usr1, NULL) == 0, "sigprocmask");

    char *hot = map(hot_pages * PAGE);
    char *cold = map(cold_pages * PAGE);
    for (size_t i = 0; i < hot_pages; i++) {
        fill(hot + i * PAGE, PAGE, HOT_SEED + i);
        ((uint64_t *)(hot + i * PAGE))[WORDS - 1] = 0;
    }
    uint64_t pass = 0;
    for (size_t j = 0; j < cold_pages; j++) {
        fill(cold + j * PAGE, PAGE, COLD_SEED + j);
        if ((j + 1) % chunk == 0) {
            for (size_t i = 0; i < hot_pages; i++) {
                hot_check(hot, i, pass);
                ((uint64_t *)(hot + i * PAGE))[WORDS - 1] = pass + 1;
            }
            pass++;
        }
    }
    printf("STREAMED passes=%lu\n", (unsigned long)pass);
    fflush(stdout);
    int sig = 0;
    CHECK(sigwait(&usr1, &sig) == 0 && sig == SIGUSR1, "sigwait");

    for (size_t j = 0; j < cold_pages; j++) {
        long bad = verify(cold + j * PAGE, PAGE, COLD_SEED + j);
        CHECK(bad < 0, "cold page %zu word %ld", j, bad);
    }
    for (size_t i = 0; i < hot_pages; i++) hot_check(hot, i, pass);
    printf("OK\n");
    return 0;
}
