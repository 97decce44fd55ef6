/* A program that checks its own data while its memory is managed by a (test) USM
 * daemon through libusm_tagger.so. Exit 0 and "OK" on stdout when every check passed.
 *
 *   workload full [pause]   heap (small/large/calloc/realloc/memalign family), mmap,
 *                           mremap, partial munmap, madvise(DONTNEED), threads, fork,
 *                           MAP_SHARED and memfd; with "pause": prints PEAK and waits
 *                           for a line on stdin before a second phase.
 *   workload own-uffd       uses its own userfaultfd on its own mmap.
 *   workload small          a few allocations only.
 *   workload fork-at-risk   forks while a page is evicted; reports how the child ended.
 *   workload churn          4 threads malloc/free large blocks for 2 s.
 *   workload evict          a 64-page buffer the test evicts through the agent between
 *                           two pauses (PEAK, PEAK2), verified after each.
 *   workload evict-shared   a 16-page buffer shared copy-on-write with a fork child
 *                           while the test evicts it (CHILD, then a line); the child
 *                           then verifies its copy, the parent its own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <malloc.h>
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

#define MiB (1024UL * 1024UL)
#define PAGE 4096UL

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "workload: check failed at line %d: ", __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                                \
            fprintf(stderr, "\n");                                                       \
            exit(3);                                                                     \
        }                                                                                \
    } while (0)

static void fill(void *p, size_t len, uint64_t seed) {
    uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++) w[i] = seed * 0x9E3779B97F4A7C15ULL + i;
}

static int verify(const void *p, size_t len, uint64_t seed) {
    const uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++)
        if (w[i] != seed * 0x9E3779B97F4A7C15ULL + i) return 0;
    return 1;
}

static int all_zero(const void *p, size_t len) {
    const unsigned char *c = p;
    for (size_t i = 0; i < len; i++)
        if (c[i]) return 0;
    return 1;
}

struct coverage {
    uint64_t managed_anon_bytes, anon_bytes, registered_bytes, register_failures, dropped, mode;
};

static void print_coverage(const char *when) {
    int (*cov)(struct coverage *) = (int (*)(struct coverage *))dlsym(RTLD_DEFAULT, "usm_tagger_coverage");
    struct coverage c = {0};
    if (!cov || cov(&c) != 0) {
        printf("COVERAGE %s unavailable\n", when);
    } else {
        printf("COVERAGE %s managed=%lu anon=%lu registered=%lu failures=%lu mode=%lu\n", when,
               (unsigned long)c.managed_anon_bytes, (unsigned long)c.anon_bytes,
               (unsigned long)c.registered_bytes, (unsigned long)c.register_failures,
               (unsigned long)c.mode);
    }
    fflush(stdout);
}

/* ---- threads ---- */
static void *churn(void *arg) {
    uint64_t id = (uintptr_t)arg;
    void *keep[64] = {0};
    size_t sizes[64] = {0};
    for (int i = 0; i < 3000; i++) {
        int slot = (i * 7 + (int)id) % 64;
        if (keep[slot]) {
            CHECK(verify(keep[slot], sizes[slot], id * 100000 + slot), "thread %lu lost data", (unsigned long)id);
            free(keep[slot]);
        }
        sizes[slot] = 16 + ((i * 2654435761U) % (96 * 1024)) / 8 * 8;
        keep[slot] = malloc(sizes[slot]);
        CHECK(keep[slot], "thread malloc");
        fill(keep[slot], sizes[slot], id * 100000 + slot);
    }
    for (int s = 0; s < 64; s++) {
        if (keep[s]) {
            CHECK(verify(keep[s], sizes[s], id * 100000 + s), "thread final");
            free(keep[s]);
        }
    }
    return NULL;
}

static int full(int pause_at_peak) {
    /* small mallocs */
    enum { NSMALL = 20000 };
    static void *small[NSMALL];
    for (int i = 0; i < NSMALL; i++) {
        size_t n = 16 + (i % 61) * 16;
        small[i] = malloc(n);
        CHECK(small[i], "small malloc");
        CHECK(malloc_usable_size(small[i]) >= n, "usable size %zu < %zu", malloc_usable_size(small[i]), n);
        fill(small[i], n, i);
    }
    /* large mallocs */
    enum { NLARGE = 6 };
    void *large[NLARGE];
    for (int i = 0; i < NLARGE; i++) {
        large[i] = malloc(3 * MiB + i * 4096);
        CHECK(large[i], "large malloc");
        fill(large[i], 3 * MiB, 1000 + i);
    }
    /* calloc is zeroed even when recycled */
    char *z = calloc(1, 2 * MiB);
    CHECK(z && all_zero(z, 2 * MiB), "calloc not zero");
    memset(z, 0x5a, 2 * MiB);
    free(z);
    z = calloc(2 * MiB, 1);
    CHECK(z && all_zero(z, 2 * MiB), "recycled calloc not zero");
    /* realloc chain keeps the prefix */
    char *r = malloc(100);
    fill(r, 96, 77);
    for (size_t n = 200; n < 8 * MiB; n *= 3) {
        r = realloc(r, n);
        CHECK(r && verify(r, 96, 77), "realloc lost prefix at %zu", n);
    }
    r = reallocarray(r, 1000, 1000);
    CHECK(r && verify(r, 96, 77), "reallocarray");
    /* alignment family */
    void *a1 = memalign(4096, 1 * MiB);
    CHECK(a1 && ((uintptr_t)a1 % 4096) == 0, "memalign");
    void *a2 = NULL;
    CHECK(posix_memalign(&a2, 64, 12345) == 0 && ((uintptr_t)a2 % 64) == 0, "posix_memalign");
    CHECK(posix_memalign(&a2, 3, 10) == EINVAL, "posix_memalign(3) must be EINVAL");
    void *a3 = aligned_alloc(1 << 16, 1 << 16);
    CHECK(a3 && ((uintptr_t)a3 % (1 << 16)) == 0, "aligned_alloc");
    void *a4 = valloc(5000);
    CHECK(a4 && ((uintptr_t)a4 % PAGE) == 0, "valloc");
    void *a5 = pvalloc(5000);
    CHECK(a5 && ((uintptr_t)a5 % PAGE) == 0 && malloc_usable_size(a5) >= 8192, "pvalloc");
    fill(a1, 1 * MiB, 5);
    CHECK(verify(a1, 1 * MiB, 5), "memalign data");
    void *big_aligned = memalign(2 * MiB, 4 * MiB);
    CHECK(big_aligned && ((uintptr_t)big_aligned % (2 * MiB)) == 0, "2MiB memalign");
    fill(big_aligned, 4 * MiB, 6);
    CHECK(malloc(SIZE_MAX / 2) == NULL && errno == ENOMEM, "huge malloc must fail with ENOMEM");

    /* direct mmap, grown with mremap */
    size_t mlen = 12 * MiB;
    char *m = mmap(NULL, mlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED, "mmap");
    fill(m, mlen, 42);
    char *m2 = mremap(m, mlen, 36 * MiB, MREMAP_MAYMOVE);
    CHECK(m2 != MAP_FAILED, "mremap");
    CHECK(verify(m2, mlen, 42), "mremap lost data");
    fill(m2 + mlen, 24 * MiB, 43);
    /* madvise(DONTNEED): the range reads back as zeros, then takes new data */
    CHECK(madvise(m2 + 4 * MiB, 2 * MiB, MADV_DONTNEED) == 0, "madvise");
    CHECK(all_zero(m2 + 4 * MiB, 2 * MiB), "DONTNEED range not zero");
    fill(m2 + 4 * MiB, 2 * MiB, 44);
    /* partial munmap in the middle */
    char *p = mmap(NULL, 8 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "mmap p");
    fill(p, 8 * MiB, 50);
    CHECK(munmap(p + 2 * MiB, 2 * MiB) == 0, "partial munmap");
    CHECK(verify(p, 2 * MiB, 50), "left of hole");
    {
        /* the right part keeps its words (seed 50, offset 4MiB) */
        const uint64_t *w = (const uint64_t *)(p + 4 * MiB);
        for (size_t i = 0; i < 4 * MiB / 8; i++)
            CHECK(w[i] == 50 * 0x9E3779B97F4A7C15ULL + (4 * MiB / 8) + i, "right of hole at %zu", i);
    }
    /* MAP_SHARED anonymous and memfd stay with the kernel and still work */
    char *sh = mmap(NULL, 1 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sh != MAP_FAILED, "shared mmap");
    fill(sh, 1 * MiB, 60);
    int mfd = memfd_create("workload", MFD_CLOEXEC);
    CHECK(mfd >= 0 && ftruncate(mfd, 1 * MiB) == 0, "memfd");
    char *mf = mmap(NULL, 1 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    CHECK(mf != MAP_FAILED, "memfd mmap");
    fill(mf, 1 * MiB, 61);

    /* threads */
    pthread_t th[4];
    for (uintptr_t i = 0; i < 4; i++) CHECK(pthread_create(&th[i], NULL, churn, (void *)i) == 0, "pthread_create");
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);

    /* fork: the child sees the parent's data, writes its own copy, allocates */
    pid_t child = fork();
    CHECK(child >= 0, "fork");
    if (child == 0) {
        if (!verify(large[0], 3 * MiB, 1000) || !verify(m2, 4 * MiB, 42) || !verify(sh, 1 * MiB, 60)) _exit(10);
        fill(large[0], 3 * MiB, 2000);
        /* A managed parent's child attaches on its own: wait for the verdict (mode 0 =
         * still attaching), so its new memory below is registered on its own context. */
        int (*state)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "usm_tagger_state");
        int mode = -1;
        if (state)
            for (int i = 0; i < 500 && (mode = state()) == 0; i++) usleep(10000);
        printf("CHILD_MODE %d\n", mode);
        fflush(stdout);
        void *c = malloc(5 * MiB);
        if (!c) _exit(11);
        fill(c, 5 * MiB, 3000);
        if (!verify(c, 5 * MiB, 3000) || !verify(large[0], 3 * MiB, 2000)) _exit(12);
        fill(sh, 4096, 62); /* shared: the parent sees it */
        _exit(0);
    }
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child failed: status %d", status);
    CHECK(verify(large[0], 3 * MiB, 1000), "child's write leaked into the parent");
    CHECK(verify(sh, 4096, 62), "shared page not shared");

    if (pause_at_peak) {
        print_coverage("peak");
        printf("PEAK\n");
        fflush(stdout);
        char line[64];
        CHECK(fgets(line, sizeof line, stdin) != NULL, "stdin closed");
    } else {
        print_coverage("peak");
    }

    /* second phase: everything still intact, and new memory still works */
    for (int i = 0; i < NSMALL; i++) {
        CHECK(verify(small[i], 16 + (i % 61) * 16, i), "small %d", i);
        free(small[i]);
    }
    for (int i = 0; i < NLARGE; i++) {
        CHECK(verify(large[i], 3 * MiB, 1000 + i), "large %d", i);
        free(large[i]);
    }
    CHECK(verify(m2, 4 * MiB, 42) && verify(m2 + 4 * MiB, 2 * MiB, 44), "mmap after peak");
    CHECK(verify(big_aligned, 4 * MiB, 6) && verify(a1, 1 * MiB, 5), "aligned after peak");
    CHECK(verify(mf, 1 * MiB, 61), "memfd");
    void *late = malloc(16 * MiB);
    CHECK(late, "late malloc");
    fill(late, 16 * MiB, 99);
    CHECK(verify(late, 16 * MiB, 99), "late data");
    char *late_map = mmap(NULL, 4 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(late_map != MAP_FAILED, "late mmap");
    fill(late_map, 4 * MiB, 98);
    CHECK(verify(late_map, 4 * MiB, 98), "late mmap data");
    free(late);
    free(r);
    free(z);
    munmap(m2, 36 * MiB);
    munmap(p, 2 * MiB);
    munmap(p + 4 * MiB, 4 * MiB);
    print_coverage("end");
    printf("OK\n");
    return 0;
}

/* ---- a program with its own userfaultfd ---- */
static int own_uffd;
static char *own_area;
static void *own_handler(void *arg) {
    (void)arg;
    static char page[PAGE] __attribute__((aligned(4096)));
    for (;;) {
        struct pollfd pfd = {.fd = own_uffd, .events = POLLIN};
        if (poll(&pfd, 1, 5000) <= 0) return NULL;
        struct uffd_msg msg;
        if (read(own_uffd, &msg, sizeof msg) != sizeof msg) continue;
        if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
        unsigned long addr = msg.arg.pagefault.address & ~(PAGE - 1);
        memset(page, (int)((addr - (unsigned long)own_area) / PAGE) & 0x7f, PAGE);
        struct uffdio_copy copy = {.dst = addr, .src = (unsigned long)page, .len = PAGE};
        ioctl(own_uffd, UFFDIO_COPY, &copy);
    }
}

static int own(void) {
    own_uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    CHECK(own_uffd >= 0, "userfaultfd: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API};
    CHECK(ioctl(own_uffd, UFFDIO_API, &api) == 0, "UFFDIO_API: %s", strerror(errno));
    size_t len = 64 * PAGE;
    own_area = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(own_area != MAP_FAILED, "mmap");
    struct uffdio_register reg = {.range = {.start = (unsigned long)own_area, .len = len},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    CHECK(ioctl(own_uffd, UFFDIO_REGISTER, &reg) == 0, "own UFFDIO_REGISTER: %s", strerror(errno));
    pthread_t t;
    pthread_create(&t, NULL, own_handler, NULL);
    for (size_t i = 0; i < 64; i++)
        CHECK(own_area[i * PAGE + 123] == (char)(i & 0x7f), "own handler's data at page %zu", i);
    /* ordinary heap still works */
    char *h = malloc(3 * MiB);
    fill(h, 3 * MiB, 1);
    CHECK(verify(h, 3 * MiB, 1), "heap");
    printf("OK\n");
    return 0;
}

/* ---- pages evicted by the daemon through the agent, then faulted back ---- */
static void wait_line(void) {
    char line[64];
    CHECK(fgets(line, sizeof line, stdin) != NULL, "stdin closed");
}

static int evict(void) {
    size_t pages = 64;
    char *buf = memalign(PAGE, pages * PAGE);
    CHECK(buf, "memalign");
    fill(buf, pages * PAGE, 7);
    printf("BUF %lx %zu\n", (unsigned long)buf, pages);
    printf("PEAK\n");
    fflush(stdout);
    wait_line();
    CHECK(verify(buf, pages * PAGE, 7), "data lost across swap-out and swap-in");
    printf("PEAK2\n");
    fflush(stdout);
    wait_line();
    CHECK(verify(buf, pages * PAGE, 7), "data lost across the staging round trip");
    print_coverage("end");
    printf("OK\n");
    return 0;
}

/* ---- allocation churn: large blocks mapped and unmapped under the heap lock ---- */
static void *churn_large(void *arg) {
    uint64_t seed = (uintptr_t)arg;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0;; i++) {
        size_t n = 512 * 1024 + (size_t)(i % 7) * 65536;
        char *p = malloc(n);
        CHECK(p, "churn malloc");
        /* Touch only the chunk's first bytes (the page malloc itself just wrote): the
         * faults happen inside malloc/free, with the heap lock held. */
        fill(p, 64, seed + i);
        CHECK(verify(p, 64, seed + i), "churn data");
        free(p);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= 2) return NULL;
    }
}

static int churn_mode(void) {
    pthread_t t[4];
    for (uintptr_t i = 0; i < 4; i++) pthread_create(&t[i], NULL, churn_large, (void *)(i * 1000000));
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("OK\n");
    return 0;
}

/* ---- a child forked while one of the parent's pages is out (in staging) ---- */
static int fork_at_risk(void) {
    size_t pages = 16;
    char *buf = memalign(PAGE, pages * PAGE);
    CHECK(buf, "memalign");
    fill(buf, pages * PAGE, 9);
    printf("BUF %lx %zu\n", (unsigned long)buf, pages);
    printf("PEAK\n");
    fflush(stdout);
    wait_line(); /* the test evicts page 0 meanwhile */
    pid_t child = fork();
    CHECK(child >= 0, "fork");
    if (child == 0) {
        /* The child never touches the evicted page: it only waits. */
        printf("CHILD\n");
        fflush(stdout);
        for (;;) pause();
    }
    wait_line(); /* the daemon is gone now */
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child, "waitpid");
    printf("CHILD_STATUS %s %d\n", WIFSIGNALED(status) ? "signal" : "exit",
           WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    CHECK(verify(buf, pages * PAGE, 9), "parent data after the daemon died");
    printf("OK\n");
    return 0;
}

/* ---- pages the test evicts while a fork child shares them copy-on-write ---- */
static int evict_shared(void) {
    size_t pages = 16;
    char *buf = memalign(PAGE, pages * PAGE);
    CHECK(buf, "memalign");
    fill(buf, pages * PAGE, 5);
    int go[2];
    CHECK(pipe(go) == 0, "pipe");
    printf("BUF %lx %zu\n", (unsigned long)buf, pages);
    fflush(stdout);
    pid_t child = fork();
    CHECK(child >= 0, "fork");
    if (child == 0) {
        char c;
        close(go[1]);
        if (read(go[0], &c, 1) != 1) _exit(4);
        /* Its copy is the original page, whatever the parent's agent did meanwhile. */
        _exit(verify(buf, pages * PAGE, 5) ? 0 : 3);
    }
    close(go[0]);
    printf("CHILD\n");
    fflush(stdout);
    wait_line(); /* the test evicts every page of buf, then puts it back */
    CHECK(write(go[1], "g", 1) == 1, "write");
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child, "waitpid");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
    CHECK(verify(buf, pages * PAGE, 5), "parent data after the shared pages were evicted");
    printf("OK\n");
    return 0;
}

static int small_only(void) {
    char *s = strdup("hello");
    void *b = malloc(1 * MiB);
    fill(b, 1 * MiB, 3);
    CHECK(verify(b, 1 * MiB, 3) && strcmp(s, "hello") == 0, "small");
    free(b);
    free(s);
    print_coverage("end");
    printf("OK\n");
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "full")) return full(argc > 2 && !strcmp(argv[2], "pause"));
    if (!strcmp(argv[1], "own-uffd")) return own();
    if (!strcmp(argv[1], "small")) return small_only();
    if (!strcmp(argv[1], "evict")) return evict();
    if (!strcmp(argv[1], "churn")) return churn_mode();
    if (!strcmp(argv[1], "fork-at-risk")) return fork_at_risk();
    if (!strcmp(argv[1], "evict-shared")) return evict_shared();
    return 2;
}
