/* fault_probe: times each first touch of PAGES fresh anonymous pages, then re-reads them.
 * Built by `daemon_bench` with gcc; run plain (the kernel's first-touch fault) or under
 * `usm exec` (the fault goes to the USM daemon in another process).
 *
 *   fault_probe PAGES WARM
 *
 * 1. Pre-faults its own result arrays, measures the clock_gettime pair (median of 1001).
 * 2. mmaps (WARM + PAGES) pages, MADV_NOHUGEPAGE, touches WARM pages untimed (warms the
 *    fault path), then writes one word to each of PAGES pages, timing each write alone.
 * 3. Re-reads every page, timing each read (a swap-in when the page was evicted), and
 *    checks the word it wrote: any mismatch prints "BAD n" and exits 3.
 * Output on stdout: "timer_ns N", "touch v v v ...", "reread v v v ...", "OK" (ns).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL

static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static uint32_t clamp32(uint64_t v) { return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v; }

static void print_all(const char *name, const uint32_t *v, size_t n) {
    fputs(name, stdout);
    for (size_t i = 0; i < n; i++) printf(" %u", v[i]);
    putchar('\n');
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: fault_probe PAGES WARM\n");
        return 2;
    }
    size_t pages = strtoull(argv[1], NULL, 10), warm = strtoull(argv[2], NULL, 10);
    if (pages == 0) {
        fprintf(stderr, "fault_probe: PAGES must be > 0\n");
        return 2;
    }
    uint32_t *touch = malloc(pages * sizeof *touch), *reread = malloc(pages * sizeof *reread);
    if (!touch || !reread) {
        perror("malloc");
        return 2;
    }
    memset(touch, 0, pages * sizeof *touch);
    memset(reread, 0, pages * sizeof *reread);
    static uint32_t pairs[1001];
    for (int i = 0; i < 1001; i++) {
        uint64_t a = now_ns(), b = now_ns();
        pairs[i] = clamp32(b - a);
    }
    qsort(pairs, 1001, sizeof pairs[0], cmp_u32);

    size_t len = (pages + warm) * PAGE;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    madvise(base, len, MADV_NOHUGEPAGE);
    for (size_t i = 0; i < warm; i++) *(volatile uint64_t *)(base + i * PAGE) = 1;
    char *data = base + warm * PAGE;
    for (size_t i = 0; i < pages; i++) {
        volatile uint64_t *w = (volatile uint64_t *)(data + i * PAGE);
        uint64_t t0 = now_ns();
        *w = i + 1;
        uint64_t t1 = now_ns();
        touch[i] = clamp32(t1 - t0);
    }
    size_t bad = 0;
    for (size_t i = 0; i < pages; i++) {
        volatile uint64_t *w = (volatile uint64_t *)(data + i * PAGE);
        uint64_t t0 = now_ns();
        uint64_t v = *w;
        uint64_t t1 = now_ns();
        reread[i] = clamp32(t1 - t0);
        if (v != i + 1) bad++;
    }
    if (bad) {
        printf("BAD %zu of %zu pages lost their word\n", bad, pages);
        return 3;
    }
    printf("timer_ns %u\n", pairs[500]);
    print_all("touch", touch, pages);
    print_all("reread", reread, pages);
    puts("OK");
    return 0;
}
