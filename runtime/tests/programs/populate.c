/* A program that maps its data with MAP_POPULATE, as databases and JVMs do to pre-fault
 * their heap: MB MiB are mapped populated, the resident anonymous memory right after the
 * mmap is reported, then every page is written and verified twice. Under the daemon the
 * mapping is managed, so its pages must come in through the daemon within the budget, not
 * all at once by the kernel before the range is registered.
 * Prints "MAPPED rss_anon_kb=N", "END rss_anon_kb=N", then "OK" (exit 0), or "BAD ..."
 * (exit 3).
 *
 *   populate MB
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"

#define MiB (1024UL * 1024UL)

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    size_t mb = strtoul(argv[1], NULL, 10);
    size_t len = mb * MiB;
    char *data = mmap(NULL, len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    CHECK(data != MAP_FAILED, "mmap");
    printf("MAPPED rss_anon_kb=%ld\n", rss_anon_kb());
    for (size_t m = 0; m < mb; m++) fill(data + m * MiB, MiB, 7 + m);
    for (int pass = 0; pass < 2; pass++)
        for (size_t m = 0; m < mb; m++)
            if (verify(data + m * MiB, MiB, 7 + m) >= 0) {
                printf("BAD pass %d MiB %zu\n", pass, m);
                return 3;
            }
    printf("END rss_anon_kb=%ld\n", rss_anon_kb());
    printf("OK\n");
    return 0;
}
