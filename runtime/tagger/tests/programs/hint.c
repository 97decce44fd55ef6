/* Calls libusm.so's usm_hint (two arguments, as USM documents it) and usm_hint_range
   (header usm.h). Prints the addresses it hinted and every return code. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "usm.h"

int main(void) {
    size_t len = 1 << 20;
    /* Two neighbouring mappings: the kernel may merge them into one VMA; the hint
       must still cover the first one only. */
    char *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *a = mmap(b - len, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    char *big = malloc(3 * len);  /* a large block: a mapping of its own */
    char *small = malloc(100);    /* a dlmalloc chunk */
    char *buf = malloc(len);
    if (a == MAP_FAILED || b == MAP_FAILED || !big || !small || !buf) return 2;
    memset(a, 1, len);
    memset(b, 2, len);
    memset(buf, 3, len);
    printf("a=%p b=%p big=%p small=%p buf=%p\n", (void *)a, (void *)b, (void *)big,
           (void *)small, (void *)buf);
    int r_a = usm_hint(a + 12345, "PRIORITY=HIGH; EVICTION=DENY"); /* 1: a's mapping */
    int r_big = usm_hint(big, "PRIORITY=LOW; EVICTION=ALLOW");     /* 2: the block */
    int r_small = usm_hint(small, "PREFETCH=8");                    /* 3: its pages */
    int r_range = usm_hint_range(buf, len, "PREFETCH=16");          /* 4: exact */
    errno = 0;
    int r_cold = usm_hint(a, "cold");                               /* 5: refused */
    int e_cold = errno;
    int r_null = usm_hint_range(buf, len, NULL);
    int r_empty = usm_hint_range(buf, 0, "PREFETCH=1");
    int r_unmapped = usm_hint((void *)4096, "PREFETCH=1");
    /* A hole punched in a: the hint covers the part holding addr (6: front, 7: back). */
    munmap(a + len / 4, len / 4);
    int r_front = usm_hint(a, "PREFETCH=2");
    int r_back = usm_hint(a + len - 1, "PREFETCH=3");
    /* b moved into the middle of another mapping: its extent follows it there, not the
       mapping it landed in (8). */
    char *hole = mmap(NULL, 3 * len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *moved = mremap(b, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, hole + len);
    if (hole == MAP_FAILED || moved != hole + len) return 4;
    printf("moved=%p\n", (void *)moved);
    int r_moved = usm_hint(moved + 5, "PREFETCH=4");
    printf("a=%d big=%d small=%d range=%d cold=%d/%d null=%d empty=%d unmapped=%d "
           "front=%d back=%d moved=%d\n",
           r_a, r_big, r_small, r_range, r_cold, e_cold, r_null, r_empty, r_unmapped, r_front,
           r_back, r_moved);
    free(buf);
    free(small);
    free(big);
    return 0;
}
