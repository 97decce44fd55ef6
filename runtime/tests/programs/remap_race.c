/* Threads that free and move address ranges at once, so that one thread's block lands
 * where another's was a moment ago: the userfaultfd events of the two changes (A's
 * UNMAP or REMAP of R, B's REMAP into R) race to the daemon, and a daemon that applies
 * A's stale event after B's drops B's pages. The working set is larger than the pool, so
 * most pages are in swap when their block moves: a page lost reads zeros.
 *
 *   remap_race THREADS MB ITERATIONS   prints "OK", exit 0; a wrong word prints
 *                                      "BAD line N: ..." and exits 3.
 *
 * Each thread keeps a ring of blocks (MB in all, split between threads). An iteration
 * takes the oldest block: verifies it, grows it with mremap(MAYMOVE) to twice its size
 * (it moves: its neighbours are in use), verifies the moved half, writes the new half,
 * then munmaps the oldest block of the ring after it and maps a fresh one in its place.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "check.h"

#define PAGE 4096UL
#define RING 16

struct block {
    char *p;
    size_t len;
    uintptr_t at; /* the address its content was written at */
    uint64_t seed;
};

struct worker {
    uint64_t id;
    size_t small; /* bytes of a fresh block */
    long iterations;
    struct block ring[RING];
};

static inline uint64_t word(uintptr_t at, uint64_t seed) {
    uint64_t x = (uint64_t)at * 0x9E3779B97F4A7C15ULL ^ seed * 0xC2B2AE3D27D4EB4FULL;
    return (x ^ x >> 31) | 1; /* never zero */
}

static void put(char *p, size_t len, uintptr_t at, uint64_t seed) {
    for (size_t i = 0; i < len; i += PAGE) *(uint64_t *)(p + i) = word(at + i, seed);
}

static void expect(const struct block *b, size_t len, uint64_t id, const char *what) {
    for (size_t i = 0; i < len; i += PAGE) {
        uint64_t got = *(const uint64_t *)(b->p + i), want = word(b->at + i, b->seed);
        CHECK(got == want, "thread %lu %s: page %zu of %zu at %p (written at %#lx): want %#lx got %#lx",
              (unsigned long)id, what, i / PAGE, len / PAGE, (void *)(b->p + i),
              (unsigned long)(b->at + i), (unsigned long)want, (unsigned long)got);
    }
}

static void fresh(struct worker *w, struct block *b, uint64_t seed) {
    b->len = w->small;
    b->p = mmap(NULL, b->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(b->p != MAP_FAILED, "mmap");
    b->at = (uintptr_t)b->p;
    b->seed = seed;
    put(b->p, b->len, b->at, b->seed);
}

static void *run(void *arg) {
    struct worker *w = arg;
    uint64_t seed = w->id << 40;
    for (int i = 0; i < RING; i++) fresh(w, &w->ring[i], ++seed);
    for (long it = 0; it < w->iterations; it++) {
        struct block *b = &w->ring[it % RING];
        expect(b, b->len, w->id, "block before its move");
        size_t old = b->len;
        char *q = mremap(b->p, old, old * 2, MREMAP_MAYMOVE);
        CHECK(q != MAP_FAILED, "mremap");
        b->p = q;
        expect(b, old, w->id, "block after its move");
        /* The grown half, written as if the block had always been here. */
        b->len = old * 2;
        put(q + old, old, b->at + old, b->seed);
        /* The next block goes (its range is free for another thread's move) and a fresh
         * one takes its place in the ring. */
        struct block *n = &w->ring[(it + 1) % RING];
        expect(n, n->len, w->id, "block before its unmap");
        CHECK(munmap(n->p, n->len) == 0, "munmap");
        fresh(w, n, ++seed);
    }
    for (int i = 0; i < RING; i++) {
        expect(&w->ring[i], w->ring[i].len, w->id, "block, final pass");
        CHECK(munmap(w->ring[i].p, w->ring[i].len) == 0, "munmap");
    }
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: remap_race THREADS MB ITERATIONS");
    int threads = atoi(argv[1]);
    size_t mb = strtoul(argv[2], NULL, 10);
    long iterations = atol(argv[3]);
    CHECK(threads > 0 && threads <= 16 && mb > 0 && iterations > 0, "bad arguments");
    /* A ring of RING blocks, each between small and 2 x small: about 1.5 x small each. */
    size_t small = (mb << 20) / (size_t)threads / RING * 2 / 3 / PAGE * PAGE;
    CHECK(small >= PAGE, "too little memory for the threads");
    pthread_t t[16];
    struct worker *w = calloc((size_t)threads, sizeof *w);
    CHECK(w, "calloc");
    for (int i = 0; i < threads; i++) {
        w[i] = (struct worker){.id = (uint64_t)i + 1, .small = small, .iterations = iterations};
        CHECK(pthread_create(&t[i], NULL, run, &w[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    printf("OK\n");
    return 0;
}
