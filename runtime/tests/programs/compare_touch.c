/* `usm compare`'s test program: writes a pattern to every 4 KiB page of MIB MiB, then
 * reads it back PASSES times (a lost page exits 3), and prints its throughput as
 * "N ops/s" (one op = one page touched), the convention `usm compare` reads by default.
 * Usage: compare_touch MIB PASSES */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MIB PASSES\n", argv[0]);
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10), passes = strtoul(argv[2], NULL, 10);
    size_t pages = mib * 256, page = 4096;
    uint8_t *buf = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    double t0 = now_s();
    for (size_t p = 0; p < pages; p++)
        *(uint64_t *)(buf + p * page) = p * 2654435761u + 1;
    size_t ops = pages;
    for (size_t r = 0; r < passes; r++) {
        for (size_t p = 0; p < pages; p++) {
            if (*(uint64_t *)(buf + p * page) != p * 2654435761u + 1) {
                fprintf(stderr, "page %zu lost its value\n", p);
                return 3;
            }
        }
        ops += pages;
    }
    double dt = now_s() - t0;
    printf("touched %zu pages in %.3f s: %.0f ops/s\n", ops, dt, ops / dt);
    return 0;
}
