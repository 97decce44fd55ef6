/* usm_hint as USM documents it, under `usm exec --pool`: a region D hinted
 * "PRIORITY=HIGH; EVICTION=DENY" (two-argument form, an interior address: the whole
 * mapping) is written once, then a working set W several times the pool is written and
 * read twice. With the hint, every page of D must still be resident (mincore) while W
 * swaps; without it (`plain`), the oldest pages — D's — are the victims.
 *
 * usage: hint_deny deny|plain D_MB W_MB
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
    CHECK(argc == 4, "usage: hint_deny deny|plain D_MB W_MB");
    int deny = strcmp(argv[1], "deny") == 0;
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
    /* Accepted: the explicit-length form, and (for `deny`) USM's documented call. */
    int rc = usm_hint_range(w, wlen, "PREFETCH=8");
    CHECK(rc == 0, "usm_hint_range: %d", rc);
    if (deny) {
        rc = usm_hint(d + dlen / 2 + 123, "PRIORITY=HIGH; EVICTION=DENY");
        CHECK(rc == 0, "usm_hint: %d", rc);
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
