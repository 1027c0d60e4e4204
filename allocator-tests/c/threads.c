/* Threads that Rust did not start, for the foreign_threads scenario: a C
 * thread, started here with the C library's own pthread_create, that calls
 * back into Rust. Built twice by build.rs: into the scenario binaries, and
 * as a shared library that the scenario loads with dlopen (ENTRY names the
 * entry point of each). */
#include <pthread.h>
#include <stddef.h>

#ifndef ENTRY
#define ENTRY memwatch_test_c_thread
#endif

typedef void (*callback)(void);

struct job {
    callback cb;
};

static void *run(void *arg) {
    ((struct job *)arg)->cb();
    return NULL;
}

/* Runs cb on a new thread and waits for that thread to end. 0 on success. */
int ENTRY(callback cb) {
    struct job job = {cb};
    pthread_t t;
    if (pthread_create(&t, NULL, run, &job) != 0) {
        return -1;
    }
    return pthread_join(t, NULL);
}
