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
    printf("a=%d big=%d small=%d range=%d cold=%d/%d null=%d empty=%d unmapped=%d\n", r_a,
           r_big, r_small, r_range, r_cold, e_cold, r_null, r_empty, r_unmapped);
    free(buf);
    free(small);
    free(big);
    return 0;
}
