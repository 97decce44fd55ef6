/* A program that checks its own data while the USM daemon manages its memory (run under
 * `usm exec` / `usm run` with a pool that is a fraction of its working set).
 * Prints "OK" and exits 0 when every check passed; "BAD ..." and exit 3 otherwise.
 *
 *   daemon_workload mixed MB [nofork]  small and large mallocs, calloc/realloc, mmap, mremap,
 *                                partial munmap, madvise(DONTNEED), 4 threads, fork
 *                                (child verifies inherited data and writes its own),
 *                                MAP_SHARED anonymous memory and a memfd; MB of data.
 *   daemon_workload storm MB S   4 threads rewrite and verify MB of data for S seconds,
 *                                printing "PASS n" after each verified round.
 *   daemon_workload free MB      touches MB in an mmap, prints TOUCHED, waits for a line,
 *                                madvise(MADV_FREE)s it, prints FREED, waits, exits.
 *   daemon_workload own-uffd     serves its own userfaultfd on its own mmap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define MiB (1024UL * 1024UL)
#define PAGE 4096UL

static int all_zero(const void *p, size_t len) {
    const unsigned char *c = p;
    for (size_t i = 0; i < len; i++)
        if (c[i]) return 0;
    return 1;
}

struct job {
    char *buf;
    size_t len;
    uint64_t seed;
    double secs;
    long rounds;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *churn(void *arg) {
    struct job *j = arg;
    double end = now() + j->secs;
    uint64_t seed = j->seed;
    do {
        fill(j->buf, j->len, seed);
        long bad = verify(j->buf, j->len, seed);
        CHECK(bad < 0, "thread seed %lu word %ld", (unsigned long)seed, bad);
        seed += 7;
        j->rounds++;
    } while (now() < end);
    return NULL;
}

static int mixed(size_t mb, int do_fork) {
    /* Small mallocs. */
    enum { NSMALL = 4000 };
    static char *small[NSMALL];
    for (int i = 0; i < NSMALL; i++) {
        small[i] = malloc(16 + i % 200);
        CHECK(small[i], "malloc small");
        memset(small[i], i & 0xff, 16 + i % 200);
    }
    /* Large malloc, calloc, realloc. */
    size_t big = mb * MiB / 4;
    char *a = malloc(big);
    CHECK(a, "malloc big");
    fill(a, big, 1);
    char *z = calloc(1, big / 4);
    CHECK(z && all_zero(z, big / 4), "calloc is zero");
    fill(z, big / 4, 2);
    char *r = realloc(z, big / 2);
    CHECK(r, "realloc");
    CHECK(verify(r, big / 4, 2) < 0, "realloc kept data");
    /* mmap, mremap, partial munmap, DONTNEED. */
    size_t mlen = mb * MiB / 4;
    char *m = mmap(NULL, mlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    fill(m, mlen, 3);
    char *m2 = mremap(m, mlen, 2 * mlen, MREMAP_MAYMOVE);
    CHECK(m2 != MAP_FAILED, "mremap");
    CHECK(verify(m2, mlen, 3) < 0, "mremap kept data");
    CHECK(all_zero(m2 + mlen, mlen), "mremap growth is zero");
    fill(m2 + mlen, mlen, 4);
    CHECK(munmap(m2 + mlen / 2, mlen / 2) == 0, "partial munmap");
    CHECK(madvise(m2 + mlen + mlen / 2, mlen / 2, MADV_DONTNEED) == 0, "DONTNEED");
    CHECK(all_zero(m2 + mlen + mlen / 2, mlen / 2), "DONTNEED reads zero");
    CHECK(verify(m2, mlen / 2, 3) < 0, "head after partial munmap");
    CHECK(verify(m2 + mlen, mlen / 2, 4) < 0, "second half kept");
    /* MAP_SHARED anonymous memory and a memfd (left to the kernel). */
    char *sh = mmap(NULL, 4 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sh != MAP_FAILED, "shared mmap");
    fill(sh, 4 * MiB, 5);
    int mfd = memfd_create("daemon-workload", 0);
    CHECK(mfd >= 0 && ftruncate(mfd, 4 * MiB) == 0, "memfd");
    char *mf = mmap(NULL, 4 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    CHECK(mf != MAP_FAILED, "memfd mmap");
    fill(mf, 4 * MiB, 6);
    /* Threads, each with its own malloc'd buffer. */
    pthread_t t[4];
    struct job jobs[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (struct job){malloc(mb * MiB / 8), mb * MiB / 8, 100 + i, 0.3, 0};
        CHECK(jobs[i].buf, "thread buffer");
        CHECK(pthread_create(&t[i], NULL, churn, &jobs[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    /* Everything again after the threads stirred the pool. */
    CHECK(verify(a, big, 1) < 0, "big malloc");
    CHECK(verify(r, big / 4, 2) < 0, "realloc");
    CHECK(verify(m2, mlen / 2, 3) < 0, "mremapped");
    CHECK(verify(sh, 4 * MiB, 5) < 0, "shared");
    CHECK(verify(mf, 4 * MiB, 6) < 0, "memfd");
    for (int i = 0; i < NSMALL; i++)
        for (int k = 0; k < 16 + i % 200; k++)
            CHECK((unsigned char)small[i][k] == (i & 0xff), "small %d", i);
    if (!do_fork) {
        printf("OK\n");
        return 0;
    }
    /* Fork: the child sees the parent's data (some of it in swap) and writes its own. */
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        if (verify(a, big, 1) >= 0 || verify(m2 + mlen, mlen / 2, 4) >= 0) _exit(4);
        fill(a, big / 2, 9);
        char *c = malloc(2 * MiB);
        if (!c) _exit(5);
        fill(c, 2 * MiB, 10);
        if (verify(c, 2 * MiB, 10) >= 0 || verify(a, big / 2, 9) >= 0) _exit(6);
        _exit(0);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    CHECK(verify(a, big, 1) < 0, "parent data after the child wrote its copy");
    printf("OK\n");
    return 0;
}

static int storm(size_t mb, double secs) {
    pthread_t t[4];
    struct job jobs[4];
    for (int i = 0; i < 4; i++) {
        size_t len = mb * MiB / 4;
        jobs[i] = (struct job){mmap(NULL, len, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                               len, 1000 + i, secs, 0};
        CHECK(jobs[i].buf != MAP_FAILED, "mmap");
        CHECK(pthread_create(&t[i], NULL, churn, &jobs[i]) == 0, "pthread_create");
    }
    printf("STARTED\n");
    fflush(stdout);
    long rounds = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        rounds += jobs[i].rounds;
    }
    printf("PASS %ld\nOK\n", rounds);
    return 0;
}

static void wait_line(void) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) exit(0);
}

static int free_mode(size_t mb) {
    size_t len = mb * MiB;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    fill(m, len, 11);
    printf("TOUCHED\n");
    fflush(stdout);
    wait_line();
    CHECK(madvise(m, len, MADV_FREE) == 0, "MADV_FREE");
    printf("FREED\n");
    fflush(stdout);
    wait_line();
    /* After MADV_FREE a page reads either its old content or zeros, never garbage. */
    const uint64_t *w = (const uint64_t *)m;
    for (size_t i = 0; i < len / 8; i++) CHECK(w[i] == 0 || w[i] == val(11, i), "word %zu", i);
    printf("OK\n");
    return 0;
}

static int uffd_fd;

static void *own_handler(void *arg) {
    char *src = arg;
    for (;;) {
        struct pollfd p = {uffd_fd, POLLIN, 0};
        if (poll(&p, 1, 2000) <= 0) return NULL;
        struct uffd_msg msg;
        if (read(uffd_fd, &msg, sizeof msg) != sizeof msg) continue;
        if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
        struct uffdio_copy c = {msg.arg.pagefault.address & ~(PAGE - 1), (unsigned long)src,
                                PAGE, 0, 0};
        ioctl(uffd_fd, UFFDIO_COPY, &c);
    }
}

static int own_uffd(void) {
    uffd_fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    CHECK(uffd_fd >= 0, "userfaultfd: %s", strerror(errno));
    struct uffdio_api api = {UFFD_API, 0, 0};
    CHECK(ioctl(uffd_fd, UFFDIO_API, &api) == 0, "UFFDIO_API");
    size_t len = 16 * PAGE;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    struct uffdio_register reg = {{(unsigned long)m, len}, UFFDIO_REGISTER_MODE_MISSING, 0};
    CHECK(ioctl(uffd_fd, UFFDIO_REGISTER, &reg) == 0, "register: %s", strerror(errno));
    char *src = aligned_alloc(PAGE, PAGE);
    memset(src, 0x5a, PAGE);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, own_handler, src) == 0, "pthread_create");
    for (size_t i = 0; i < len; i += PAGE) CHECK(m[i] == 0x5a, "own fault page %zu", i / PAGE);
    /* Its heap still works (managed by the daemon meanwhile). */
    char *h = malloc(8 * MiB);
    fill(h, 8 * MiB, 12);
    CHECK(verify(h, 8 * MiB, 12) < 0, "heap");
    printf("OK\n");
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    size_t mb = argc > 2 ? strtoul(argv[2], NULL, 10) : 32;
    if (!strcmp(argv[1], "mixed")) return mixed(mb, !(argc > 3 && !strcmp(argv[3], "nofork")));
    if (!strcmp(argv[1], "storm")) return storm(mb, argc > 3 ? atof(argv[3]) : 2.0);
    if (!strcmp(argv[1], "free")) return free_mode(mb);
    if (!strcmp(argv[1], "own-uffd")) return own_uffd();
    return 2;
}
