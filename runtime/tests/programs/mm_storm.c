/* Issue 15's multi-threaded program: four threads each run malloc / realloc / mmap /
 * mremap / partial munmap / madvise(DONTNEED) over their share of the working set while
 * the main thread forks children that verify and rewrite the main thread's data. Every
 * 8-byte word written is a function of (address it was written at, thread, generation),
 * and every word is read back and compared, after every step that could lose it: data
 * that moved (realloc, mremap) is compared against the address it was written at.
 * A DONTNEEDed range must read zeros (never its old data, never another page's).
 *
 *   mm_storm run MB ROUNDS     MB of working set in all (4 threads x MB/4, plus MB/8 of
 *                              the main thread's), ROUNDS rounds; prints "OK", exit 0.
 *   mm_storm storm MB SECONDS  the same, round after round for SECONDS seconds
 *                              (0 = until killed); prints "STARTED" once the first
 *                              round's data is written, "ROUND n" after each round.
 *
 * A wrong word prints "BAD line N: ..." (thread, what, address, expected, found) and
 * exits 3. Output is line-buffered (the tests read it while the program runs).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define MiB (1024UL * 1024UL)
#define PAGE 4096UL
#define THREADS 4
/* Heap blocks per thread; their sizes cycle through SIZES (both sides of the tagger's
 * 256 KiB large-block threshold). */
#define BLOCKS_MAX 4096
static const size_t SIZES[] = {4000, 24 * 1024, 100 * 1024, 300 * 1024, 640 * 1024, 1500};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])

static volatile int started_threads;
static volatile int stop_all;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static inline uint64_t word(uintptr_t addr, uint64_t tid, uint64_t gen) {
    uint64_t x = (uint64_t)addr * 0x9E3779B97F4A7C15ULL ^ (tid << 56) ^ (gen * 0xC2B2AE3D27D4EB4FULL);
    x ^= x >> 29;
    return x | 1; /* never zero: a page read as zeros is always caught */
}

/* Writes [p, p+len) as if it lived at `at` (the address used for the pattern). */
static void put(void *p, size_t len, uintptr_t at, uint64_t tid, uint64_t gen) {
    uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++) w[i] = word(at + i * 8, tid, gen);
}

/* Checks [p, p+len) against what `put(.., at, tid, gen)` wrote. */
static void expect(const void *p, size_t len, uintptr_t at, uint64_t tid, uint64_t gen, const char *what) {
    const uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++) {
        uint64_t want = word(at + i * 8, tid, gen);
        CHECK(w[i] == want, "thread %lu gen %lu %s: word %zu of %zu at %p (written at %#lx): want %#lx got %#lx",
              (unsigned long)tid, (unsigned long)gen, what, i, len / 8, (void *)(w + i),
              (unsigned long)(at + i * 8), (unsigned long)want, (unsigned long)w[i]);
    }
}

static void expect_zero(const void *p, size_t len, uint64_t tid, const char *what) {
    const uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++)
        CHECK(w[i] == 0, "thread %lu %s: word %zu at %p not zero after DONTNEED: %#lx",
              (unsigned long)tid, what, i, (void *)(w + i), (unsigned long)w[i]);
}

struct block {
    char *p;
    size_t len;
    uintptr_t at; /* address its content was written at */
};

/* Small objects per thread (calloc'd, freed in another order than allocated). */
#define SMALL_MAX 8192

struct worker {
    uint64_t tid;
    size_t share; /* bytes */
    int rounds;   /* < 0: until stop_all */
    uint64_t gen;
    struct block blocks[BLOCKS_MAX];
    struct block small[SMALL_MAX];
};

static void *map(size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "mmap %zu", len);
    return p;
}

/* One round of a worker over its share (heap: 3/8 of it growing to about 9/16; mapping: 1/4
 * growing to 1/2, minus what is unmapped): about 1.06 x the share at its peak. */
static void round_of(struct worker *w) {
    uint64_t t = w->tid, g = ++w->gen;
    /* 1. malloc: blocks totalling 3/8 of the share, written. */
    size_t heap = w->share / 8 * 3, used = 0;
    int n = 0;
    while (used < heap && n < BLOCKS_MAX) {
        size_t len = SIZES[(n + t) % NSIZES] / 8 * 8;
        char *p = malloc(len);
        CHECK(p, "malloc %zu", len);
        put(p, len, (uintptr_t)p, t, g);
        w->blocks[n++] = (struct block){p, len, (uintptr_t)p};
        used += len;
    }
    /* 1b. Small objects (16 B .. 4 KiB, 1/16 of the share) from calloc: zeros, then
     * written. Many small allocations keep the heap's bookkeeping (inside managed pages,
     * often evicted) busy while other threads fault. */
    size_t small = w->share / 16, sused = 0;
    int ns = 0;
    while (sused < small && ns < SMALL_MAX) {
        size_t len = 16 + ((uint64_t)(ns + 1) * 2654435761u + t) % 4081 / 8 * 8;
        char *p = calloc(1, len);
        CHECK(p, "calloc %zu", len);
        expect_zero(p, len, t, "calloc'd object");
        put(p, len, (uintptr_t)p, t, g);
        w->small[ns++] = (struct block){p, len, (uintptr_t)p};
        sused += len;
    }
    /* 2. realloc every other block to twice its size: the old content must follow it. */
    for (int i = 0; i < n; i += 2) {
        struct block *b = &w->blocks[i];
        char *q = realloc(b->p, b->len * 2);
        CHECK(q, "realloc %zu", b->len * 2);
        expect(q, b->len, b->at, t, g, "realloc'd block");
        put(q + b->len, b->len, b->at + b->len, t, g);
        b->p = q;
        b->len *= 2;
    }
    /* 3. mmap share/4, written; mremap to share/2 (may move): the old part must follow. */
    size_t mlen = (w->share / 4) & ~(PAGE - 1);
    char *m = map(mlen);
    uintptr_t mat = (uintptr_t)m;
    put(m, mlen, mat, t, g);
    char *m2 = mremap(m, mlen, mlen * 2, MREMAP_MAYMOVE);
    CHECK(m2 != MAP_FAILED, "mremap");
    expect(m2, mlen, mat, t, g, "mremap'd mapping");
    put(m2 + mlen, mlen, mat + mlen, t, g);
    size_t m2len = mlen * 2;
    /* 4. Partial munmap: the middle quarter goes; both sides must stay intact. */
    size_t q = (m2len / 4) & ~(PAGE - 1);
    CHECK(munmap(m2 + q, q) == 0, "munmap middle");
    expect(m2, q, mat, t, g, "head after partial munmap");
    expect(m2 + 2 * q, m2len - 2 * q, mat + 2 * q, t, g, "tail after partial munmap");
    /* 5. DONTNEED an eighth of the tail: zeros (not the old data), then written again. */
    char *dn = m2 + 2 * q;
    size_t dlen = (m2len / 8) & ~(PAGE - 1);
    CHECK(madvise(dn, dlen, MADV_DONTNEED) == 0, "madvise DONTNEED");
    expect_zero(dn, dlen, t, "DONTNEED range");
    put(dn, dlen, mat + 2 * q, t, g);
    /* 6. Everything once more (most of it is in swap by now), then freed. */
    for (int i = 0; i < n; i++) {
        struct block *b = &w->blocks[i];
        expect(b->p, b->len, b->at, t, g, "heap block, final pass");
        free(b->p);
    }
    /* Small objects: verified and freed with a stride (not in allocation order), so
     * free coalesces with neighbours on other pages. */
    for (int k = 0; k < ns; k++) {
        struct block *b = &w->small[(size_t)k * 7919 % (size_t)ns];
        if (!b->p) continue;
        expect(b->p, b->len, b->at, t, g, "small object, final pass");
        free(b->p);
        b->p = NULL;
    }
    for (int k = 0; k < ns; k++)
        if (w->small[k].p) {
            expect(w->small[k].p, w->small[k].len, w->small[k].at, t, g, "small object, final pass");
            free(w->small[k].p);
        }
    expect(m2, q, mat, t, g, "mapping head, final pass");
    expect(m2 + 2 * q, m2len - 2 * q, mat + 2 * q, t, g, "mapping tail, final pass");
    CHECK(munmap(m2, q) == 0 && munmap(m2 + 2 * q, m2len - 2 * q) == 0, "munmap rest");
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    __sync_fetch_and_add(&started_threads, 1);
    for (int r = 0; w->rounds < 0 ? !stop_all : r < w->rounds; r++) round_of(w);
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The main thread's share: a mapping and a few heap blocks; a fork child verifies them
 * (as of the fork), rewrites them with its own generation and verifies that. */
struct own {
    char *map;
    size_t len;
    char *heap[4];
    size_t hlen;
};

static void own_put(struct own *o, uint64_t gen) {
    put(o->map, o->len, (uintptr_t)o->map, 99, gen);
    for (int i = 0; i < 4; i++) put(o->heap[i], o->hlen, (uintptr_t)o->heap[i], 99, gen);
}

static void own_expect(struct own *o, uint64_t gen, const char *what) {
    expect(o->map, o->len, (uintptr_t)o->map, 99, gen, what);
    for (int i = 0; i < 4; i++) expect(o->heap[i], o->hlen, (uintptr_t)o->heap[i], 99, gen, what);
}

static void fork_once(struct own *o, uint64_t gen) {
    own_put(o, gen);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        own_expect(o, gen, "fork child, inherited");
        own_put(o, gen + 1000);
        own_expect(o, gen + 1000, "fork child, own");
        char *extra = malloc(1 << 20); /* the child's own new memory */
        CHECK(extra, "malloc in child");
        put(extra, 1 << 20, (uintptr_t)extra, 98, gen);
        expect(extra, 1 << 20, (uintptr_t)extra, 98, gen, "fork child, new");
        _exit(0);
    }
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork child failed: status %#x", st);
    own_expect(o, gen, "parent after fork child");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 4 || (strcmp(argv[1], "run") && strcmp(argv[1], "storm"))) {
        fprintf(stderr, "usage: mm_storm run MB ROUNDS | storm MB SECONDS\n");
        return 2;
    }
    int storm = !strcmp(argv[1], "storm");
    size_t total = strtoul(argv[2], NULL, 10) * MiB;
    long arg = strtol(argv[3], NULL, 10);
    static struct worker ws[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        ws[i].tid = (uint64_t)i + 1;
        ws[i].share = total / THREADS;
        ws[i].rounds = storm ? -1 : (int)arg;
        CHECK(pthread_create(&th[i], NULL, worker_main, &ws[i]) == 0, "pthread_create");
    }
    struct own o;
    o.len = (total / 16) & ~(PAGE - 1);
    o.map = map(o.len);
    o.hlen = total / 64 / 8 * 8;
    for (int i = 0; i < 4; i++) {
        o.heap[i] = malloc(o.hlen);
        CHECK(o.heap[i], "malloc own");
    }
    double t0 = now();
    uint64_t gen = 1;
    fork_once(&o, gen++);
    if (storm) {
        while (started_threads < THREADS) usleep(1000);
        printf("STARTED\n");
        for (long r = 1; arg == 0 || now() - t0 < arg; r++) {
            fork_once(&o, gen++);
            pthread_mutex_lock(&out_lock);
            printf("ROUND %ld\n", r);
            pthread_mutex_unlock(&out_lock);
        }
        stop_all = 1;
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    fork_once(&o, gen++);
    own_expect(&o, gen - 1, "main share, final");
    printf("OK %.1f s\n", now() - t0);
    return 0;
}
