/* Forks repeatedly while the USM daemon evicts: a working set several times the pool,
 * two threads rewriting their own buffers all along (faults and evictions in flight at
 * every fork), and the main thread forking. Each child verifies every stripe of the
 * parent's data as it was at its fork (much of it in swap, shared through the daemon's
 * reference-counted slots), overwrites half of it with its own values, verifies those,
 * and exits 0. The parent checks each child's status and that its own data did not
 * change. Prints "FORK i" per child, then "OK" (exit 0), or "BAD ..." (exit 3).
 *
 *   fork_storm MB FORKS      MB of data in the main buffer (plus MB/2 per thread)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define MiB (1024UL * 1024UL)
#define STRIPES 8

struct churn {
    char *buf;
    size_t len;
    uint64_t seed;
    volatile int stop;
};

/* Rewrites and verifies its own buffer until told to stop. */
static void *churn(void *arg) {
    struct churn *c = arg;
    while (!c->stop) {
        fill(c->buf, c->len, c->seed);
        long bad = verify(c->buf, c->len, c->seed);
        CHECK(bad < 0, "churn seed %lu word %ld", (unsigned long)c->seed, bad);
        c->seed += 3;
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3) return 2;
    size_t mb = strtoul(argv[1], NULL, 10);
    int forks = atoi(argv[2]);
    size_t len = mb * MiB, stripe = len / STRIPES;
    char *data = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(data != MAP_FAILED, "mmap");
    uint64_t seeds[STRIPES];
    for (int s = 0; s < STRIPES; s++) {
        seeds[s] = 1 + s;
        fill(data + s * stripe, stripe, seeds[s]);
    }
    struct churn c[2];
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        /* One heap buffer, one direct mapping. */
        size_t clen = len / 2;
        char *b = i == 0 ? malloc(clen)
                         : mmap(NULL, clen, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(b && b != MAP_FAILED, "churn buffer");
        c[i] = (struct churn){b, clen, 500 + 100 * i, 0};
        CHECK(pthread_create(&t[i], NULL, churn, &c[i]) == 0, "pthread_create");
    }
    printf("STARTED\n");
    for (int f = 0; f < forks; f++) {
        /* A new stripe before each fork, so each child has its own view to check. */
        int s = f % STRIPES;
        seeds[s] = 100 + f;
        fill(data + s * stripe, stripe, seeds[s]);
        pid_t pid = fork();
        CHECK(pid >= 0, "fork");
        if (pid == 0) {
            for (int k = 0; k < STRIPES; k++)
                if (verify(data + k * stripe, stripe, seeds[k]) >= 0) _exit(10 + k);
            /* Copy-on-write of half the inherited data, then new memory of its own. */
            for (int k = 0; k < STRIPES; k += 2) fill(data + k * stripe, stripe, 7000 + k);
            char *own = malloc(2 * MiB);
            if (!own) _exit(20);
            fill(own, 2 * MiB, 9000);
            for (int k = 0; k < STRIPES; k++) {
                uint64_t want = k % 2 == 0 ? 7000 + k : seeds[k];
                if (verify(data + k * stripe, stripe, want) >= 0) _exit(30 + k);
            }
            if (verify(own, 2 * MiB, 9000) >= 0) _exit(40);
            _exit(0);
        }
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "fork %d: child status %#x", f,
              status);
        for (int k = 0; k < STRIPES; k++)
            CHECK(verify(data + k * stripe, stripe, seeds[k]) < 0,
                  "fork %d: parent stripe %d changed", f, k);
        printf("FORK %d\n", f);
    }
    for (int i = 0; i < 2; i++) {
        c[i].stop = 1;
        pthread_join(t[i], NULL);
    }
    printf("OK\n");
    return 0;
}
