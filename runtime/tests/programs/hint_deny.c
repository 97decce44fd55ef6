/* usm_hint as USM documents it, under `usm exec --pool`: a region D hinted
 * "PRIORITY=HIGH; EVICTION=DENY" (two-argument form, an interior address: the whole
 * mapping) is written once, then a working set W several times the pool (hinted
 * "PREFETCH=8" with usm_hint_range) is written and read twice. With the hints, every
 * page of D must still be resident (mincore) while W swaps, and W's swap-ins read ahead;
 * without them (`plain`), the oldest pages — D's — are the victims.
 *
 * `moved`: D is hinted, then moved with mremap: the hint follows it (D stays resident).
 * `unmapped`: D is hinted, unmapped, and a new mapping made at the same address: the
 * new mapping starts without the hint (evicted like `plain`).
 *
 * usage: hint_deny deny|plain|moved|unmapped D_MB W_MB
 * prints: "hints ok" (return codes checked), "d_resident=N/M w_resident=N/M", "OK". */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "usm.h"

static size_t resident(void *p, size_t len) {
    size_t pages = len / 4096, n = 0;
    unsigned char *vec = malloc(pages);
    CHECK(vec, "malloc");
    CHECK(mincore(p, len, vec) == 0, "mincore: %s", strerror(errno));
    for (size_t i = 0; i < pages; i++) n += vec[i] & 1;
    free(vec);
    return n;
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: hint_deny deny|plain|moved|unmapped D_MB W_MB");
    int plain = strcmp(argv[1], "plain") == 0;
    int moved = strcmp(argv[1], "moved") == 0, unmapped = strcmp(argv[1], "unmapped") == 0;
    size_t dlen = (size_t)atoi(argv[2]) << 20, wlen = (size_t)atoi(argv[3]) << 20;
    char *d = mmap(NULL, dlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(d != MAP_FAILED, "mmap");
    char *w = malloc(wlen);
    CHECK(w, "malloc");

    /* Refused: the old header's examples and a bad value; -EINVAL and errno. */
    errno = 0;
    CHECK(usm_hint(d, "cold") == -EINVAL && errno == EINVAL, "cold: errno %d", errno);
    CHECK(usm_hint(d, "EVICTION=NEVER") == -EINVAL, "EVICTION=NEVER");
    CHECK(usm_hint_range(w, 0, "PREFETCH=8") == -EINVAL, "empty range");
    /* Accepted (for `deny`): the explicit-length form and USM's documented call. */
    if (!plain) {
        int rc = usm_hint_range(w, wlen, "PREFETCH=8");
        CHECK(rc == 0, "usm_hint_range: %d", rc);
        rc = usm_hint(d + dlen / 2 + 123, "PRIORITY=HIGH; EVICTION=DENY");
        CHECK(rc == 0, "usm_hint: %d", rc);
    }
    if (moved || unmapped) usleep(300000); /* hints are messages: let the daemon have it */
    if (moved) {
        /* To a free place a little away (MREMAP_FIXED over a reserved hole). */
        char *hole = mmap(NULL, 3 * dlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(hole != MAP_FAILED, "mmap hole");
        char *to = mremap(d, dlen, dlen, MREMAP_MAYMOVE | MREMAP_FIXED, hole + dlen);
        CHECK(to == hole + dlen, "mremap: %s", strerror(errno));
        munmap(hole, dlen);
        munmap(hole + 2 * dlen, dlen);
        d = to;
    }
    if (unmapped) {
        CHECK(munmap(d, dlen) == 0, "munmap");
        char *again = mmap(d, dlen, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        CHECK(again == d, "mmap at the same address: %s", strerror(errno));
    }
    printf("hints ok\n");
    fflush(stdout);

    fill(d, dlen, 7);
    fill(w, wlen, 11);
    for (int pass = 0; pass < 2; pass++) {
        long bad = verify(w, wlen, 11);
        CHECK(bad < 0, "W word %ld wrong in pass %d", bad, pass);
    }
    /* Measured before D is read again (reading would bring its pages back). */
    size_t dres = resident(d, dlen), wres = resident(w, wlen);
    printf("d_resident=%zu/%zu w_resident=%zu/%zu\n", dres, dlen / 4096, wres, wlen / 4096);
    long bad = verify(d, dlen, 7);
    CHECK(bad < 0, "D word %ld wrong", bad);
    bad = verify(w, wlen, 11);
    CHECK(bad < 0, "W word %ld wrong at the end", bad);
    printf("OK\n");
    return 0;
}
