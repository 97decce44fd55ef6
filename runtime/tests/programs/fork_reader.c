/* A fork child that reads a dataset much larger than the pool, as a redis BGSAVE child
 * does: the parent fills MB MiB (most of it goes to swap), forks, and the child verifies
 * every byte twice, then reports its resident anonymous memory (RssAnon) and exits 0.
 * With the child's swap-ins held as frames of the budget and evicted like any other
 * page, that stays near the pool; if they are the kernel's (not evictable) it grows to
 * the whole dataset. The parent checks the child's status and its own data.
 * Prints "CHILD rss_anon_kb=N", then "OK" (exit 0), or "BAD ..." (exit 3).
 *
 *   fork_reader MB
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define MiB (1024UL * 1024UL)

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    size_t mb = strtoul(argv[1], NULL, 10);
    size_t len = mb * MiB;
    char *data = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(data != MAP_FAILED, "mmap");
    for (size_t m = 0; m < mb; m++) fill(data + m * MiB, MiB, 1 + m);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        for (int pass = 0; pass < 2; pass++)
            for (size_t m = 0; m < mb; m++)
                if (verify(data + m * MiB, MiB, 1 + m) >= 0) {
                    printf("BAD child pass %d MiB %zu\n", pass, m);
                    _exit(10);
                }
        printf("CHILD rss_anon_kb=%ld\n", rss_anon_kb());
        _exit(0);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    for (size_t m = 0; m < mb; m++)
        CHECK(verify(data + m * MiB, MiB, 1 + m) < 0, "parent MiB %zu changed", m);
    printf("OK\n");
    return 0;
}
