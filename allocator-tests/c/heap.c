/* C allocations for the c_heap scenario: on the calling thread, on a C
 * thread that waits between commands (so it is live and idle when the
 * reading is taken), and on a C thread that grows until the process ends.
 * Every block is written, so that it is resident. */
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct blocks {
    void **items;
    size_t len, cap;
};

/* Allocates n blocks of size bytes into b; returns the usable bytes that
 * came into use: the blocks', and what the array of pointers grew by. */
static size_t take(struct blocks *b, size_t n, size_t size) {
    size_t array = b->items ? malloc_usable_size(b->items) : 0;
    size_t usable = 0;
    for (size_t i = 0; i < n; i++) {
        if (b->len == b->cap) {
            b->cap = b->cap ? b->cap * 2 : 64;
            b->items = realloc(b->items, b->cap * sizeof(void *));
            if (!b->items) abort();
        }
        void *p = malloc(size);
        if (!p) abort();
        memset(p, 0x5a, size);
        usable += malloc_usable_size(p);
        b->items[b->len++] = p;
    }
    return usable + malloc_usable_size(b->items) - array;
}

static void give_back(struct blocks *b) {
    for (size_t i = 0; i < b->len; i++) free(b->items[i]);
    free(b->items);
    b->items = NULL;
    b->len = b->cap = 0;
}

static struct blocks here;

size_t memwatch_test_c_malloc(size_t n, size_t size) { return take(&here, n, size); }
void memwatch_test_c_free_all(void) { give_back(&here); }

/* A C thread that runs one command at a time and waits in between. */
struct worker {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int cmd; /* 0 idle, 1 alloc, 2 free, 3 exit */
    size_t n, size, usable;
    struct blocks held;
};

static void *work(void *arg) {
    struct worker *w = arg;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (w->cmd == 0) pthread_cond_wait(&w->changed, &w->lock);
        if (w->cmd == 1) w->usable = take(&w->held, w->n, w->size);
        if (w->cmd == 2) give_back(&w->held);
        int exiting = w->cmd == 3;
        w->cmd = 0;
        pthread_cond_broadcast(&w->changed);
        if (exiting) break;
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static void command(struct worker *w, int cmd) {
    pthread_mutex_lock(&w->lock);
    w->cmd = cmd;
    pthread_cond_broadcast(&w->changed);
    while (w->cmd != 0) pthread_cond_wait(&w->changed, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* The worker's own memory is static: the test's process makes one. */
static struct worker the_worker = {
    .lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER};

void memwatch_test_worker_start(void) {
    if (pthread_create(&the_worker.thread, NULL, work, &the_worker) != 0) abort();
}
size_t memwatch_test_worker_alloc(size_t n, size_t size) {
    the_worker.n = n;
    the_worker.size = size;
    command(&the_worker, 1);
    return the_worker.usable;
}
void memwatch_test_worker_free(void) { command(&the_worker, 2); }
void memwatch_test_worker_stop(void) {
    command(&the_worker, 3);
    pthread_join(the_worker.thread, NULL);
}

static void *grow(void *arg) {
    (void)arg;
    struct blocks b = {0};
    for (;;) {
        take(&b, 1, 1 << 20);
        usleep(1000);
    }
    return NULL;
}

/* A C thread that allocates 1 MiB a millisecond until the process ends. */
void memwatch_test_c_grow_forever(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, grow, NULL) != 0) abort();
    pthread_detach(t);
}

void *__libc_valloc(size_t size);
void *__libc_pvalloc(size_t size);

/* memalign as glibc takes it (an alignment below 16, 0 included, is 16;
 * one that is not a power of two is rounded up), and glibc's __libc_valloc
 * and __libc_pvalloc: returns a bit for each case that failed (null, or
 * not aligned), 0 if all hold. Every block is freed with free(). */
int memwatch_test_c_aligned_cases(void) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    struct { void *p; size_t align; } cases[] = {
        {memalign(0, 100), 16},
        {memalign(24, 100), 32},
        {memalign(48, 5000), 64},
        {memalign(4096, 10), 4096},
        {__libc_valloc(100), page},
        {__libc_pvalloc(100), page},
    };
    int failed = 0;
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        if (!cases[i].p || ((size_t)cases[i].p % cases[i].align) != 0) failed |= 1 << i;
        free(cases[i].p);
    }
    return failed;
}
