/* Allocator throughput: THREADS threads each run OPS malloc/touch/free operations over a
 * window of 256 live blocks of 16..4096 bytes. Prints the median ns/op of RUNS runs after
 * one warm-up run. Compare plain glibc with LD_PRELOAD=libusm_tagger.so (unmanaged:
 * USM_SOCKET pointing nowhere) to measure the replacement allocator itself:
 *
 *   gcc -O2 -pthread -o /tmp/malloc_bench runtime/tagger/tests/programs/malloc_bench.c
 *   /tmp/malloc_bench 1; /tmp/malloc_bench 2
 *   USM_SOCKET=/nonexistent LD_PRELOAD=$T/libusm_tagger.so /tmp/malloc_bench 1   # and 2
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define OPS 2000000
#define RUNS 5
#define WINDOW 256

static void *worker(void *arg) {
    uint64_t x = (uintptr_t)arg * 0x9E3779B97F4A7C15ULL + 1;
    void *live[WINDOW] = {0};
    for (int i = 0; i < OPS; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        int slot = (int)(x % WINDOW);
        free(live[slot]);
        size_t n = 16 + (x >> 20) % 4081;
        char *p = malloc(n);
        p[0] = (char)i; p[n - 1] = (char)i;
        live[slot] = p;
    }
    for (int s = 0; s < WINDOW; s++) free(live[s]);
    return NULL;
}

static double run(int threads) {
    pthread_t t[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    return ns / ((double)OPS * threads);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 64) return 2;
    run(threads); /* warm-up */
    double r[RUNS];
    for (int i = 0; i < RUNS; i++) r[i] = run(threads);
    qsort(r, RUNS, sizeof r[0], cmp);
    printf("threads=%d median_ns_per_op=%.1f min=%.1f max=%.1f\n", threads, r[RUNS / 2], r[0], r[RUNS - 1]);
    return 0;
}
