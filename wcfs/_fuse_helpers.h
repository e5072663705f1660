/* C glue for wcfs/_fuse.pyx that cannot (or should not) be written in Cython.
 *
 * 1. It pins the libfuse API level (FUSE_USE_VERSION) before any libfuse header
 *    is included, and pulls in <linux/fuse.h> for the wire structs the binding
 *    builds itself (struct fuse_open_out with FOPEN_STREAM, which libfuse's
 *    fuse_reply_open cannot express).
 *
 * 2. The event queue.  libfuse calls the interrupt callback of a request with
 *    its own per-request lock held, possibly concurrently with or after our
 *    reply to that request, and it calls the log callback from arbitrary
 *    threads.  Neither may take the GIL (a Python thread holding the GIL can be
 *    waiting for that very libfuse lock, e.g. in fuse_req_interrupt_func) and
 *    neither may touch binding objects that a reply can free.  So both only
 *    append a plain-data event (an integer request id, or a formatted log
 *    line) to this process-wide queue and signal a condition variable; the
 *    binding's dispatcher thread drains the queue with the GIL and does the
 *    Python-level work (look the id up, call the handler, log).
 *
 * 3. The loop wake-up signal.  fuse_session_exit() only sets a flag: the
 *    thread inside fuse_session_loop_mt() sleeps in sem_wait() until a worker
 *    finishes, and workers sleep in read(/dev/fuse) until the kernel sends a
 *    request.  A signal with a no-op handler installed without SA_RESTART
 *    makes that sem_wait() fail with EINTR, so the loop notices the flag and
 *    cancels its workers.  We take a real-time signal nobody else handles.
 *
 * Locking: wcfs_q.mu protects every field of wcfs_q, the last-error buffer
 * and the choice of the wake-up signal.  It is a leaf lock: nothing else is
 * acquired while holding it.
 */
#ifndef WCFS_FUSE_HELPERS_H
#define WCFS_FUSE_HELPERS_H

#define FUSE_USE_VERSION 314

#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { WCFS_EV_INTR = 1, WCFS_EV_LOG = 2 };

typedef struct wcfs_ev {
    struct wcfs_ev *next;
    int kind;        /* WCFS_EV_INTR or WCFS_EV_LOG */
    int level;       /* WCFS_EV_LOG: enum fuse_log_level */
    uint64_t id;     /* WCFS_EV_INTR: binding request id */
    char *msg;       /* WCFS_EV_LOG: malloc'ed, NUL-terminated */
} wcfs_ev;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    wcfs_ev *head, *tail;   /* FIFO of undelivered events */
    int running;            /* a dispatcher consumes events */
    int stop;               /* dispatcher asked to return */
    char lasterr[1024];     /* last libfuse message of level <= ERR */
} wcfs_q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0, {0}};

/* Append an event; the caller has already filled it.  Returns 0 when no
 * dispatcher runs (the caller then keeps ownership of ev). */
static int wcfs_q_push(wcfs_ev *ev)
{
    int ok;
    ev->next = NULL;
    pthread_mutex_lock(&wcfs_q.mu);
    ok = wcfs_q.running;
    if (ok) {
        if (wcfs_q.tail)
            wcfs_q.tail->next = ev;
        else
            wcfs_q.head = ev;
        wcfs_q.tail = ev;
        pthread_cond_signal(&wcfs_q.cv);
    }
    pthread_mutex_unlock(&wcfs_q.mu);
    return ok;
}

/* fuse_interrupt_func_t: data is the binding's request id, never a pointer. */
static void wcfs_on_interrupt(fuse_req_t req, void *data)
{
    wcfs_ev *ev = (wcfs_ev *)calloc(1, sizeof(*ev));
    (void)req;
    if (ev == NULL) {
        fputs("wcfs.fuse: out of memory: FUSE interrupt dropped\n", stderr);
        return;
    }
    ev->kind = WCFS_EV_INTR;
    ev->id = (uint64_t)(uintptr_t)data;
    if (!wcfs_q_push(ev)) {
        /* no dispatcher: the loop is not running, nobody can act on it */
        free(ev);
    }
}

/* fuse_log_func_t: forward libfuse's diagnostics to Python logging.  libfuse
 * sometimes builds one line with several calls, so fragments are collected
 * per thread until a newline completes the line. */
static __thread char wcfs_logline[1024];
static __thread size_t wcfs_loglen;

static void wcfs_on_log(enum fuse_log_level level, const char *fmt, va_list ap)
{
    char *buf = wcfs_logline;
    size_t n;
    int r;
    wcfs_ev *ev;

    r = vsnprintf(buf + wcfs_loglen, sizeof(wcfs_logline) - wcfs_loglen, fmt, ap);
    if (r > 0)
        wcfs_loglen += (size_t)r;
    if (wcfs_loglen >= sizeof(wcfs_logline))
        wcfs_loglen = sizeof(wcfs_logline) - 1;
    n = wcfs_loglen;
    if (n == 0 || (buf[n - 1] != '\n' && n < sizeof(wcfs_logline) - 1))
        return;     /* line not complete yet */
    wcfs_loglen = 0;
    while (n > 0 && buf[n - 1] == '\n')
        buf[--n] = 0;

    if (level <= FUSE_LOG_ERR) {
        pthread_mutex_lock(&wcfs_q.mu);
        snprintf(wcfs_q.lasterr, sizeof(wcfs_q.lasterr), "%s", buf);
        pthread_mutex_unlock(&wcfs_q.mu);
    }

    ev = (wcfs_ev *)calloc(1, sizeof(*ev));
    if (ev != NULL) {
        ev->kind = WCFS_EV_LOG;
        ev->level = (int)level;
        ev->msg = strdup(buf);
        if (ev->msg != NULL && wcfs_q_push(ev))
            return;
        free(ev->msg);
        free(ev);
    }
    fprintf(stderr, "wcfs.fuse: %s\n", buf);
}

/* Copy (and clear) the last libfuse error message into out. */
static void wcfs_take_lasterr(char *out, size_t size)
{
    pthread_mutex_lock(&wcfs_q.mu);
    snprintf(out, size, "%s", wcfs_q.lasterr);
    wcfs_q.lasterr[0] = 0;
    pthread_mutex_unlock(&wcfs_q.mu);
}

/* Mark the dispatcher as running; returns 0 if it already was. */
static int wcfs_q_start(void)
{
    int started;
    pthread_mutex_lock(&wcfs_q.mu);
    started = !wcfs_q.running;
    wcfs_q.running = 1;
    wcfs_q.stop = 0;
    pthread_mutex_unlock(&wcfs_q.mu);
    return started;
}

static void wcfs_q_stop(void)
{
    pthread_mutex_lock(&wcfs_q.mu);
    wcfs_q.stop = 1;
    pthread_cond_broadcast(&wcfs_q.cv);
    pthread_mutex_unlock(&wcfs_q.mu);
}

/* Block until events are queued or stop is requested.  Returns the detached
 * list of events (caller frees each with wcfs_ev_free), or NULL on stop; on
 * stop the dispatcher is marked not running and pending events are dropped
 * (so producers fall back to stderr / drop interrupts of a dead loop). */
static wcfs_ev *wcfs_q_wait(void)
{
    wcfs_ev *list = NULL, *ev;
    pthread_mutex_lock(&wcfs_q.mu);
    while (wcfs_q.head == NULL && !wcfs_q.stop)
        pthread_cond_wait(&wcfs_q.cv, &wcfs_q.mu);
    if (wcfs_q.stop) {
        wcfs_q.running = 0;
        list = wcfs_q.head;
        wcfs_q.head = wcfs_q.tail = NULL;
        pthread_mutex_unlock(&wcfs_q.mu);
        while (list != NULL) {
            ev = list;
            list = ev->next;
            if (ev->kind == WCFS_EV_LOG)
                fprintf(stderr, "wcfs.fuse: %s\n", ev->msg);
            free(ev->msg);
            free(ev);
        }
        return NULL;
    }
    list = wcfs_q.head;
    wcfs_q.head = wcfs_q.tail = NULL;
    pthread_mutex_unlock(&wcfs_q.mu);
    return list;
}

static void wcfs_ev_free(wcfs_ev *ev)
{
    free(ev->msg);
    free(ev);
}

static void wcfs_wake_handler(int sig)
{
    (void)sig;
}

/* The wake-up signal number (installed on first use), or -1 if none is free. */
static int wcfs_wake_signal(void)
{
    static int signo = 0;
    int sig, res;
    pthread_mutex_lock(&wcfs_q.mu);
    if (signo == 0) {
        signo = -1;
        for (sig = SIGRTMAX - 1; sig > SIGRTMIN + 1; sig--) {
            struct sigaction old, sa;
            if (sigaction(sig, NULL, &old) != 0 || (old.sa_flags & SA_SIGINFO) ||
                old.sa_handler != SIG_DFL)
                continue;
            memset(&sa, 0, sizeof(sa));
            sa.sa_handler = wcfs_wake_handler;
            sigemptyset(&sa.sa_mask);
            sa.sa_flags = 0;            /* no SA_RESTART: sem_wait must fail with EINTR */
            if (sigaction(sig, &sa, NULL) == 0) {
                signo = sig;
                break;
            }
        }
    }
    res = signo;
    pthread_mutex_unlock(&wcfs_q.mu);
    return res;
}

/* Called by the loop thread before entering libfuse's loop. */
static void wcfs_unblock_wake_signal(void)
{
    sigset_t set;
    int sig = wcfs_wake_signal();
    if (sig < 0)
        return;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

/* Reply to OPEN/OPENDIR with an explicitly built fuse_open_out, so that any
 * FOPEN_* flag (notably FOPEN_STREAM) reaches the kernel. */
static int wcfs_reply_open(fuse_req_t req, uint64_t fh, uint32_t open_flags)
{
    struct fuse_open_out out;
    memset(&out, 0, sizeof(out));
    out.fh = fh;
    out.open_flags = open_flags;
    return fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

/* Notify-store a contiguous memory buffer. */
static int wcfs_notify_store(struct fuse_session *se, fuse_ino_t ino, off_t off,
                             const void *data, size_t size)
{
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].mem = (void *)data;
    return fuse_lowlevel_notify_store(se, ino, off, &bv, 0);
}

/* Copy a request's (possibly fd-backed) buffer vector into dst. */
static ssize_t wcfs_bufvec_copy_to(void *dst, size_t size, struct fuse_bufvec *src)
{
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);
    bv.buf[0].mem = dst;
    return fuse_buf_copy(&bv, src, 0);
}

#endif /* WCFS_FUSE_HELPERS_H */
