# cython: language_level=3
"""Thin binding over libfuse3's low-level API, made for the WCFS server.

What it provides beyond a plain wrapper: requests are first-class objects that
may be answered from any thread at any later time ("deferred replies": a
handler can park a `Request` and return, so a blocked client never pins a
FUSE worker thread), FUSE_INTERRUPT delivery to Python, page-cache control
(ranged ``notify_inval_inode``, ``notify_store``, ``notify_retrieve``), open
replies with FOPEN_STREAM, and a connection that asks for
FUSE_CAP_EXPLICIT_INVAL_DATA so that the kernel never drops a file's cache on
its own.

Guarantees:

* Every request is answered exactly once.  A per-request state under the
  request's own mutex makes the first ``reply_*`` win; any later one raises
  RuntimeError.  A handler that raises gets its request answered EIO (the
  exception is logged on ``wcfs.fuse`` with its traceback), and a `Request`
  that is garbage-collected unanswered is answered EIO too, so no client can
  hang on a forgotten request.  Operations the `Operations` subclass does not
  define are not registered with libfuse: it answers them ENOSYS itself
  (except open/opendir/release/releasedir, which libfuse completes with
  success, and forget, which needs no answer).
* A ``fuse_req_t`` is never touched after its reply was sent, nor after the
  session was destroyed: replies and notifications hold the session's
  lifetime lock shared; unmount/close hold it exclusively and mark the session
  dead, after which replies are refused (they return False).

Concurrency model: libfuse's multi-threaded loop (one cloned /dev/fuse fd per
worker) calls our C callbacks, which take the GIL and call the matching
`Operations` method.  Every libfuse call that can block (replies, notifies,
mount/unmount, the loop itself) runs with the GIL released: a notify can
wait on kernel page locks that only a reply from another thread releases.
libfuse runs interrupt callbacks with its own request lock held, possibly
after our reply freed everything: so the callback receives only an integer
id and queues it (C queue + condition variable, see _fuse_helpers.h); a
dispatcher thread of this module looks the id up in a weak table (entries die
with their Request) and calls the Python interrupt handler, holding no libfuse
lock.  libfuse's own diagnostics take the same queue to ``logging``.

Session.loop() runs fuse_session_loop_mt() (clone_fd, bounded thread pool) in
a helper thread and waits for it interruptibly, so signal handlers of the
caller keep working.  exit() sets libfuse's exit flag and then interrupts the
loop thread's sleep with a private real-time signal (a no-op handler without
SA_RESTART), repeating it until the loop is gone; unmount() makes the loop
return by itself once the kernel drops the connection.

Lock order (outer first): session lifetime rwlock > request mutex > event
queue mutex; the loop wake-up mutex is a leaf.  None of them is held while
waiting for the GIL's holder to do anything, and the GIL is never needed while
holding them, so a thread may block on them with or without the GIL.
"""

import errno as _errno
import logging
import os
import threading
import weakref

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.errno cimport (EBADF, ECONNABORTED, EIO, ENODEV, ENOENT, ENOMEM,
                         ENOTCONN, errno)
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.time cimport timespec
from posix.types cimport off_t

_log = logging.getLogger("wcfs.fuse")


# ---------------------------------------------------------------- C declarations

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_kill(pthread_t, int)
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, const void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)
    int pthread_rwlock_init(pthread_rwlock_t *, const void *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)

cdef extern from "<sys/stat.h>" nogil:
    cdef struct c_stat "stat":
        unsigned long st_ino
        unsigned int st_mode
        unsigned long st_nlink
        unsigned int st_uid
        unsigned int st_gid
        long st_size
        long st_blksize
        long st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim

cdef extern from "<sys/statvfs.h>" nogil:
    cdef struct c_statvfs "statvfs":
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        unsigned long f_favail
        unsigned long f_namemax

cdef extern from "_fuse_helpers.h" nogil:
    ctypedef uint64_t fuse_ino_t
    cdef struct fuse_req:
        pass
    ctypedef fuse_req *fuse_req_t
    cdef struct fuse_session:
        pass
    cdef struct fuse_loop_config:
        pass
    cdef struct fuse_bufvec:
        pass

    cdef struct fuse_file_info:
        int flags
        uint64_t fh

    cdef struct fuse_conn_info:
        unsigned int proto_major
        unsigned int proto_minor
        unsigned int max_write
        unsigned int max_read
        unsigned int max_readahead
        unsigned int capable
        unsigned int want
        unsigned int max_background
        unsigned int congestion_threshold

    cdef struct fuse_ctx:
        unsigned int uid
        unsigned int gid
        int pid

    cdef struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        c_stat attr
        double attr_timeout
        double entry_timeout

    cdef struct fuse_forget_data:
        fuse_ino_t ino
        uint64_t nlookup

    cdef struct fuse_args:
        int argc
        char **argv
        int allocated

    cdef struct fuse_lowlevel_ops:
        void (*init)(void *, fuse_conn_info *)
        void (*destroy)(void *)
        void (*lookup)(fuse_req_t, fuse_ino_t, const char *)
        void (*forget)(fuse_req_t, fuse_ino_t, uint64_t)
        void (*getattr)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*open)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*read)(fuse_req_t, fuse_ino_t, size_t, off_t, fuse_file_info *)
        void (*write)(fuse_req_t, fuse_ino_t, const char *, size_t, off_t, fuse_file_info *)
        void (*flush)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*release)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*opendir)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*readdir)(fuse_req_t, fuse_ino_t, size_t, off_t, fuse_file_info *)
        void (*releasedir)(fuse_req_t, fuse_ino_t, fuse_file_info *)
        void (*statfs)(fuse_req_t, fuse_ino_t)
        void (*retrieve_reply)(fuse_req_t, void *, fuse_ino_t, off_t, fuse_bufvec *)
        void (*forget_multi)(fuse_req_t, size_t, fuse_forget_data *)

    enum:
        FUSE_CAP_ASYNC_READ
        FUSE_CAP_SPLICE_WRITE
        FUSE_CAP_SPLICE_MOVE
        FUSE_CAP_SPLICE_READ
        FUSE_CAP_AUTO_INVAL_DATA
        FUSE_CAP_READDIRPLUS
        FUSE_CAP_READDIRPLUS_AUTO
        FUSE_CAP_EXPLICIT_INVAL_DATA
        FUSE_ROOT_ID
        FOPEN_DIRECT_IO
        FOPEN_KEEP_CACHE
        FOPEN_NONSEEKABLE
        FOPEN_STREAM
        WCFS_EV_INTR
        WCFS_EV_LOG

    ctypedef void (*fuse_interrupt_func_t)(fuse_req_t, void *)

    int fuse_version()
    const fuse_ctx *fuse_req_ctx(fuse_req_t)
    void *fuse_req_userdata(fuse_req_t)
    void fuse_req_interrupt_func(fuse_req_t, fuse_interrupt_func_t, void *)
    int fuse_req_interrupted(fuse_req_t)

    int fuse_reply_err(fuse_req_t, int)
    void fuse_reply_none(fuse_req_t)
    int fuse_reply_entry(fuse_req_t, const fuse_entry_param *)
    int fuse_reply_attr(fuse_req_t, const c_stat *, double)
    int fuse_reply_buf(fuse_req_t, const char *, size_t)
    int fuse_reply_write(fuse_req_t, size_t)
    int fuse_reply_statfs(fuse_req_t, const c_statvfs *)
    size_t fuse_add_direntry(fuse_req_t, char *, size_t, const char *, const c_stat *, off_t)
    size_t fuse_buf_size(const fuse_bufvec *)

    fuse_session *fuse_session_new(fuse_args *, const fuse_lowlevel_ops *, size_t, void *)
    int fuse_session_mount(fuse_session *, const char *)
    void fuse_session_unmount(fuse_session *)
    void fuse_session_destroy(fuse_session *)
    void fuse_session_exit(fuse_session *)
    int fuse_session_fd(fuse_session *)
    int fuse_session_loop_mt(fuse_session *, fuse_loop_config *)
    void fuse_opt_free_args(fuse_args *)

    fuse_loop_config *fuse_loop_cfg_create()
    void fuse_loop_cfg_destroy(fuse_loop_config *)
    void fuse_loop_cfg_set_idle_threads(fuse_loop_config *, unsigned int)
    void fuse_loop_cfg_set_max_threads(fuse_loop_config *, unsigned int)
    void fuse_loop_cfg_set_clone_fd(fuse_loop_config *, unsigned int)

    int fuse_lowlevel_notify_inval_inode(fuse_session *, fuse_ino_t, off_t, off_t)
    int fuse_lowlevel_notify_inval_entry(fuse_session *, fuse_ino_t, const char *, size_t)
    int fuse_lowlevel_notify_retrieve(fuse_session *, fuse_ino_t, size_t, off_t, void *)

    ctypedef struct wcfs_ev:
        wcfs_ev *next
        int kind
        int level
        uint64_t id
        char *msg

    void wcfs_on_interrupt(fuse_req_t, void *)
    void fuse_set_log_func(void *)
    void *WCFS_LOG_FUNC "((void *)wcfs_on_log)"
    void wcfs_take_lasterr(char *, size_t)
    int wcfs_q_start()
    void wcfs_q_stop()
    wcfs_ev *wcfs_q_wait()
    void wcfs_ev_free(wcfs_ev *)
    int wcfs_wake_signal()
    void wcfs_unblock_wake_signal()
    int wcfs_reply_open(fuse_req_t, uint64_t, uint32_t)
    int wcfs_notify_store(fuse_session *, fuse_ino_t, off_t, const void *, size_t)
    ssize_t wcfs_bufvec_copy_to(void *, size_t, fuse_bufvec *)


# ---------------------------------------------------------------- module constants

FUSE_VERSION = fuse_version()   # libfuse version at run time, e.g. 314 for 3.14
ROOT_ID = FUSE_ROOT_ID
CAP_ASYNC_READ = FUSE_CAP_ASYNC_READ
CAP_AUTO_INVAL_DATA = FUSE_CAP_AUTO_INVAL_DATA
CAP_EXPLICIT_INVAL_DATA = FUSE_CAP_EXPLICIT_INVAL_DATA

# Reply failures that only mean "the request no longer exists" (the client was
# interrupted and went away, the connection was aborted or unmounted).
cdef tuple _GONE = (ENOENT, ENOTCONN, ENODEV, EBADF, ECONNABORTED)


cdef object _oserror(int err, str what):
    return OSError(err, f"wcfs.fuse: {what}: {os.strerror(err)}")


# ---------------------------------------------------------------- dispatcher

# Requests that registered an interrupt handler, by id.  Weak: a Request that
# nobody references any more is gone from here, and ids are never reused, so
# a late interrupt callback (after the reply) simply finds nothing.
_intr_table = weakref.WeakValueDictionary()
cdef uint64_t _next_intr_id = 0        # under the GIL
cdef uint64_t _next_cookie = 0         # under the GIL

_dispatcher = None                     # threading.Thread, under _dispatcher_mu
_dispatcher_mu = threading.Lock()

_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL,
               3: logging.ERROR, 4: logging.WARNING, 5: logging.INFO,
               6: logging.INFO, 7: logging.DEBUG}


def _ensure_dispatcher() -> None:
    """Start the event dispatcher thread (once per process)."""
    global _dispatcher
    with _dispatcher_mu:
        if _dispatcher is not None and _dispatcher.is_alive():
            return
        wcfs_q_start()
        fuse_set_log_func(WCFS_LOG_FUNC)
        t = threading.Thread(target=_dispatch_main, name="wcfs.fuse-dispatch", daemon=True)
        t.start()
        _dispatcher = t


def _stop_dispatcher() -> None:
    global _dispatcher
    with _dispatcher_mu:
        t = _dispatcher
        _dispatcher = None
    wcfs_q_stop()
    if t is not None:
        t.join(5)


def _dispatch_main() -> None:
    cdef wcfs_ev *lst
    cdef wcfs_ev *ev
    while True:
        with nogil:
            lst = wcfs_q_wait()
        if lst == NULL:
            return
        while lst != NULL:
            ev = lst
            lst = ev.next
            try:
                if ev.kind == WCFS_EV_INTR:
                    _deliver_interrupt(ev.id)
                elif ev.kind == WCFS_EV_LOG:
                    _log.log(_LOG_LEVELS.get(ev.level, logging.ERROR), "libfuse: %s",
                             (<bytes>ev.msg).decode("utf-8", "replace"))
            except BaseException:
                _log.exception("wcfs.fuse: dispatcher: event handling failed")
            finally:
                wcfs_ev_free(ev)


cdef _deliver_interrupt(uint64_t rid):
    cdef Request r = _intr_table.get(rid)
    if r is None:
        return
    r._interrupted = True
    fn = r._intr_handler
    if fn is None or r._state != _PENDING:
        return
    try:
        fn(r)
    except BaseException:
        _log.exception("wcfs.fuse: interrupt handler %r failed", fn)


import atexit as _atexit
_atexit.register(_stop_dispatcher)


# ---------------------------------------------------------------- value classes

cdef class Attr:
    """Inode attributes for reply_entry / reply_attr (times in ns since the epoch)."""
    cdef public uint64_t ino
    cdef public uint32_t mode
    cdef public uint64_t nlink
    cdef public uint32_t uid
    cdef public uint32_t gid
    cdef public int64_t size
    cdef public int64_t blksize
    cdef public int64_t blocks
    cdef public int64_t atime_ns
    cdef public int64_t mtime_ns
    cdef public int64_t ctime_ns

    def __init__(self, uint64_t ino=0, uint32_t mode=0, uint64_t nlink=1, uint32_t uid=0,
                 uint32_t gid=0, int64_t size=0, int64_t blksize=0, int64_t blocks=0,
                 int64_t atime_ns=0, int64_t mtime_ns=0, int64_t ctime_ns=0):
        self.ino = ino
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.size = size
        self.blksize = blksize
        self.blocks = blocks
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns

    def __repr__(self):
        return (f"Attr(ino={self.ino}, mode=0o{self.mode:o}, nlink={self.nlink}, "
                f"uid={self.uid}, gid={self.gid}, size={self.size}, blksize={self.blksize}, "
                f"blocks={self.blocks}, atime_ns={self.atime_ns}, mtime_ns={self.mtime_ns}, "
                f"ctime_ns={self.ctime_ns})")


cdef inline void _set_ts(timespec *ts, int64_t ns) noexcept:
    # floor division: times before the epoch keep 0 <= tv_nsec < 1e9
    cdef int64_t sec = ns // 1000000000
    ts.tv_sec = sec
    ts.tv_nsec = ns - sec * 1000000000


cdef void _fill_stat(c_stat *st, Attr a) noexcept:
    memset(st, 0, sizeof(c_stat))
    st.st_ino = a.ino
    st.st_mode = a.mode
    st.st_nlink = a.nlink
    st.st_uid = a.uid
    st.st_gid = a.gid
    st.st_size = a.size
    st.st_blksize = a.blksize
    st.st_blocks = a.blocks
    _set_ts(&st.st_atim, a.atime_ns)
    _set_ts(&st.st_mtim, a.mtime_ns)
    _set_ts(&st.st_ctim, a.ctime_ns)


cdef class ConnInfo:
    """What was negotiated with the kernel at INIT (read-only)."""
    cdef readonly unsigned int proto_major, proto_minor, capable, want
    cdef readonly unsigned int max_write, max_read, max_readahead
    cdef readonly unsigned int max_background, congestion_threshold
    cdef readonly bint explicit_inval_data

    def __repr__(self):
        return (f"ConnInfo(proto={self.proto_major}.{self.proto_minor}, "
                f"capable=0x{self.capable:x}, want=0x{self.want:x}, "
                f"max_write={self.max_write}, max_read={self.max_read}, "
                f"max_readahead={self.max_readahead}, max_background={self.max_background}, "
                f"congestion_threshold={self.congestion_threshold}, "
                f"explicit_inval_data={self.explicit_inval_data})")


class Operations:
    """Base class of a filesystem.  Subclasses define any of:

    init(conn) / destroy()
    lookup(req, parent, name) / forget(ino, nlookup)
    getattr(req, ino, fh_or_None)
    open(req, ino, flags) / read(req, ino, size, off, fh) / write(req, ino, data, off, fh)
    flush(req, ino, fh) / release(req, ino, fh)
    opendir(req, ino, flags) / readdir(req, ino, size, off, fh) / releasedir(req, ino, fh)
    statfs(req, ino)
    retrieve_reply(cookie, ino, offset, data)

    Request handlers answer `req` (now or later, from any thread) with one of its
    reply_* methods.  forget/retrieve_reply/init/destroy take no request.
    """


# ---------------------------------------------------------------- requests

cdef enum:
    _PENDING = 0
    _REPLIED = 1


cdef struct SessState:
    fuse_session *se        # NULL before mount and after close
    pthread_rwlock_t life   # shared: any use of se or of a fuse_req_t; exclusive: unmount, close
    PyObject *pysess        # borrowed: the Session owns this struct
    pthread_mutex_t wake_mu # protects loop_tid/loop_running
    pthread_t loop_tid      # thread inside fuse_session_loop_mt (valid while loop_running)
    bint loop_running


# Enter the session for a reply/notify: returns 0 with `life` held shared, or
# -1 (lock not held) if the session is not mounted / already destroyed.
cdef inline int _enter(SessState *ss) noexcept nogil:
    pthread_rwlock_rdlock(&ss.life)
    if ss.se == NULL:
        pthread_rwlock_unlock(&ss.life)
        return -1
    return 0


cdef inline void _leave(SessState *ss) noexcept nogil:
    pthread_rwlock_unlock(&ss.life)


cdef class Request:
    """One pending FUSE request; answer it exactly once, from any thread."""
    cdef fuse_req_t _req
    cdef Session _sess
    cdef SessState *_ss
    cdef pthread_mutex_t _mu      # protects _state (and thereby the validity of _req)
    cdef int _state
    cdef bint _interrupted        # set by the dispatcher (GIL)
    cdef uint64_t _intr_id        # 0 until set_interrupt_handler
    cdef object _intr_handler
    cdef size_t _maxsize          # READ/READDIR size: replies are clipped to it (0: no limit)
    cdef readonly unsigned int uid
    cdef readonly unsigned int gid
    cdef readonly int pid
    cdef object __weakref__

    def __cinit__(self):
        pthread_mutex_init(&self._mu, NULL)
        self._state = _PENDING

    def __init__(self):
        raise TypeError("wcfs.fuse: Request objects are created by the binding")

    def __dealloc__(self):
        if self._req != NULL and self._state == _PENDING:
            self._state = _REPLIED
            with nogil:
                if _enter(self._ss) == 0:
                    fuse_reply_err(self._req, EIO)
                    _leave(self._ss)
            try:
                _log.error("wcfs.fuse: request (pid %d) dropped without a reply: answered EIO",
                           self.pid)
            except BaseException:
                pass
        pthread_mutex_destroy(&self._mu)

    def __repr__(self):
        st = "pending" if self._state == _PENDING else "replied"
        return f"<wcfs.fuse.Request pid={self.pid} uid={self.uid} {st}>"

    @property
    def replied(self) -> bool:
        return self._state != _PENDING

    @property
    def interrupted(self) -> bool:
        """Whether the kernel sent FUSE_INTERRUPT for this request."""
        cdef int r = 0
        if self._interrupted:
            return True
        with nogil:
            if _enter(self._ss) == 0:
                pthread_mutex_lock(&self._mu)
                if self._state == _PENDING:
                    r = fuse_req_interrupted(self._req)
                pthread_mutex_unlock(&self._mu)
                _leave(self._ss)
        return r != 0

    def set_interrupt_handler(self, fn) -> None:
        """Call fn(req) from the dispatcher thread when the kernel interrupts this request.

        If the request was already interrupted, fn is called soon.  fn runs with the
        GIL and no libfuse lock held; it may race with a reply made elsewhere (then
        its own reply raises RuntimeError, which is logged).  Keep it short: all
        interrupts of the process are delivered by one thread.  No-op once replied.
        """
        global _next_intr_id
        cdef uint64_t rid
        if fn is not None and not callable(fn):
            raise TypeError(f"wcfs.fuse: interrupt handler {fn!r} is not callable")
        self._intr_handler = fn
        if self._state != _PENDING:
            return
        if self._intr_id == 0:
            _next_intr_id += 1
            self._intr_id = _next_intr_id
            _intr_table[self._intr_id] = self
        rid = self._intr_id
        with nogil:
            if _enter(self._ss) == 0:
                pthread_mutex_lock(&self._mu)
                if self._state == _PENDING:
                    fuse_req_interrupt_func(self._req, wcfs_on_interrupt, <void *><uintptr_t>rid)
                pthread_mutex_unlock(&self._mu)
                _leave(self._ss)

    # Take the right to reply; raises if somebody already did.
    cdef int _claim(self, str what) except -1:
        cdef int st
        # held for a few instructions by threads that never wait for the GIL
        # meanwhile: fine to take with the GIL held
        pthread_mutex_lock(&self._mu)
        st = self._state
        self._state = _REPLIED
        pthread_mutex_unlock(&self._mu)
        if st != _PENDING:
            raise RuntimeError(f"wcfs.fuse: {what}: request was already answered")
        if self._intr_id != 0:
            _intr_table.pop(self._intr_id, None)
        return 0

    cdef object _result(self, int rc, str what):
        if rc == 0:
            return True
        if -rc in _GONE:
            return False
        raise _oserror(-rc, what)

    def reply_err(self, int err) -> bool:
        """Answer with errno `err` (0 = success for ops without data, e.g. flush/release).

        Like every reply_* method: returns True if the kernel took the reply, False if
        the request was gone (interrupted client, aborted/closed session); raises
        RuntimeError if the request was already answered.
        """
        cdef int rc = -ENOTCONN
        if err < 0 or err >= 1000:
            raise ValueError(f"wcfs.fuse: reply_err: bad errno {err}")
        self._claim("reply_err")
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_reply_err(self._req, err)
                _leave(self._ss)
        return self._result(rc, "reply_err")

    def reply_entry(self, Attr attr not None, *, double entry_timeout, double attr_timeout,
                    uint64_t generation=0) -> bool:
        """Answer LOOKUP with inode attr.ino (0: negative entry cached for entry_timeout)."""
        cdef fuse_entry_param e
        cdef int rc = -ENOTCONN
        memset(&e, 0, sizeof(e))
        e.ino = attr.ino
        e.generation = generation
        _fill_stat(&e.attr, attr)
        e.attr_timeout = attr_timeout
        e.entry_timeout = entry_timeout
        self._claim("reply_entry")
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_reply_entry(self._req, &e)
                _leave(self._ss)
        return self._result(rc, "reply_entry")

    def reply_attr(self, Attr attr not None, double timeout) -> bool:
        cdef c_stat st
        cdef int rc = -ENOTCONN
        _fill_stat(&st, attr)
        self._claim("reply_attr")
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_reply_attr(self._req, &st, timeout)
                _leave(self._ss)
        return self._result(rc, "reply_attr")

    def reply_open(self, uint64_t fh, *, bint keep_cache=False, bint direct_io=False,
                   bint nonseekable=False, bint stream=False) -> bool:
        """Answer OPEN/OPENDIR.  The open reply is built here so FOPEN_STREAM gets through."""
        cdef uint32_t flags = 0
        cdef int rc = -ENOTCONN
        if keep_cache:
            flags |= FOPEN_KEEP_CACHE
        if direct_io:
            flags |= FOPEN_DIRECT_IO
        if nonseekable:
            flags |= FOPEN_NONSEEKABLE
        if stream:
            flags |= FOPEN_STREAM
        self._claim("reply_open")
        with nogil:
            if _enter(self._ss) == 0:
                rc = wcfs_reply_open(self._req, fh, flags)
                _leave(self._ss)
        return self._result(rc, "reply_open")

    def reply_data(self, buf) -> bool:
        """Answer READ with the bytes of any contiguous buffer (no copy; clipped to size)."""
        cdef Py_buffer view
        cdef size_t n
        cdef int rc = -ENOTCONN
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            n = <size_t>view.len
            if self._maxsize != 0 and n > self._maxsize:
                n = self._maxsize
            self._claim("reply_data")
            with nogil:
                if _enter(self._ss) == 0:
                    rc = fuse_reply_buf(self._req, <const char *>view.buf, n)
                    _leave(self._ss)
        finally:
            PyBuffer_Release(&view)
        return self._result(rc, "reply_data")

    def reply_write(self, size_t count) -> bool:
        cdef int rc = -ENOTCONN
        self._claim("reply_write")
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_reply_write(self._req, count)
                _leave(self._ss)
        return self._result(rc, "reply_write")

    def reply_statfs(self, *, unsigned long bsize, unsigned long frsize, unsigned long blocks=0,
                     unsigned long bfree=0, unsigned long bavail=0, unsigned long files=0,
                     unsigned long ffree=0, unsigned long favail=0,
                     unsigned long namemax=255) -> bool:
        cdef c_statvfs st
        cdef int rc = -ENOTCONN
        memset(&st, 0, sizeof(st))
        st.f_bsize = bsize
        st.f_frsize = frsize
        st.f_blocks = blocks
        st.f_bfree = bfree
        st.f_bavail = bavail
        st.f_files = files
        st.f_ffree = ffree
        st.f_favail = favail
        st.f_namemax = namemax
        self._claim("reply_statfs")
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_reply_statfs(self._req, &st)
                _leave(self._ss)
        return self._result(rc, "reply_statfs")

    def reply_dir(self, list entries not None, size_t size, off_t off) -> bool:
        """Answer READDIR from the full listing [(name, ino, mode)].

        Entries from index `off` on are packed while they fit in `size` bytes; the
        offset cookie of entry i is i+1, which is what the kernel passes back as
        `off` for the next chunk.
        """
        cdef char *buf
        cdef size_t pos = 0, need
        cdef Py_ssize_t i, n = len(entries)
        cdef c_stat st
        cdef bytes name
        cdef int rc = -ENOTCONN
        if off < 0:
            off = 0
        buf = <char *>calloc(1, size if size > 0 else 1)
        if buf == NULL:
            raise MemoryError()
        try:
            i = off
            while i < n:
                ent = entries[i]
                name = ent[0]
                if b"\0" in name or not name:
                    raise ValueError(f"wcfs.fuse: reply_dir: bad name {name!r}")
                memset(&st, 0, sizeof(st))
                st.st_ino = ent[1]
                st.st_mode = ent[2]
                need = fuse_add_direntry(NULL, NULL, 0, name, &st, i + 1)
                if pos + need > size:
                    break
                fuse_add_direntry(NULL, buf + pos, size - pos, name, &st, i + 1)
                pos += need
                i += 1
            self._claim("reply_dir")
            with nogil:
                if _enter(self._ss) == 0:
                    rc = fuse_reply_buf(self._req, buf, pos)
                    _leave(self._ss)
        finally:
            free(buf)
        return self._result(rc, "reply_dir")


cdef Request _newreq(fuse_req_t req, Session s, size_t maxsize):
    cdef Request r = Request.__new__(Request)
    cdef const fuse_ctx *ctx = fuse_req_ctx(req)
    r._req = req
    r._sess = s
    r._ss = s._ss
    r._maxsize = maxsize
    r.uid = ctx.uid
    r.gid = ctx.gid
    r.pid = ctx.pid
    return r


cdef inline Session _sess_of(fuse_req_t req):
    return <Session>(<SessState *>fuse_req_userdata(req)).pysess


# A handler raised: log it and, unless it already answered, answer EIO.  Never raises.
cdef void _failed(fuse_req_t req, Request r, str op, BaseException exc) noexcept:
    try:
        _log.error("wcfs.fuse: %s handler failed", op, exc_info=exc)
    except BaseException:
        pass
    if r is None:
        # the Request object itself could not be made: answer directly
        with nogil:
            fuse_reply_err(req, EIO)
        return
    try:
        if r._state == _PENDING:
            r.reply_err(EIO)
    except BaseException:
        pass


# ---------------------------------------------------------------- C callbacks

cdef void _ll_init(void *userdata, fuse_conn_info *conn) noexcept with gil:
    cdef Session s = <Session>(<SessState *>userdata).pysess
    try:
        s._negotiate(conn)
    except BaseException as e:
        _log.error("wcfs.fuse: connection init failed; stopping the session", exc_info=e)
        s._init_error = e
        s._exit_requested = True
        # libfuse still answers INIT; the loop then ends and loop() raises
        fuse_session_exit(s._ss.se)


cdef void _ll_destroy(void *userdata) noexcept with gil:
    cdef SessState *ss = <SessState *>userdata
    if ss.pysess == NULL:
        return          # the Session is being deallocated: it must not be resurrected
    cdef Session s = <Session>ss.pysess
    if s._h_destroy is None:
        return
    try:
        s._h_destroy()
    except BaseException as e:
        _log.error("wcfs.fuse: destroy handler failed", exc_info=e)


cdef void _ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_lookup(r, parent, <bytes>name)
    except BaseException as e:
        _failed(req, r, "lookup", e)


cdef void _ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) noexcept with gil:
    try:
        _sess_of(req)._h_forget(ino, nlookup)
    except BaseException as e:
        _log.error("wcfs.fuse: forget handler failed", exc_info=e)
    fuse_reply_none(req)


cdef void _ll_forget_multi(fuse_req_t req, size_t count, fuse_forget_data *forgets) noexcept with gil:
    cdef size_t i
    try:
        h = _sess_of(req)._h_forget
        for i in range(count):
            try:
                h(forgets[i].ino, forgets[i].nlookup)
            except BaseException as e:
                _log.error("wcfs.fuse: forget handler failed", exc_info=e)
    except BaseException as e:
        _log.error("wcfs.fuse: forget_multi failed", exc_info=e)
    fuse_reply_none(req)


cdef void _ll_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_getattr(r, ino, fi.fh if fi != NULL else None)
    except BaseException as e:
        _failed(req, r, "getattr", e)


cdef void _ll_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_open(r, ino, fi.flags)
    except BaseException as e:
        _failed(req, r, "open", e)


cdef void _ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                   fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, size)
        s._h_read(r, ino, size, off, fi.fh)
    except BaseException as e:
        _failed(req, r, "read", e)


cdef void _ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                    fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_write(r, ino, PyBytes_FromStringAndSize(buf, size), off, fi.fh)
    except BaseException as e:
        _failed(req, r, "write", e)


cdef void _ll_flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_flush(r, ino, fi.fh)
    except BaseException as e:
        _failed(req, r, "flush", e)


cdef void _ll_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_release(r, ino, fi.fh)
    except BaseException as e:
        _failed(req, r, "release", e)


cdef void _ll_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_opendir(r, ino, fi.flags)
    except BaseException as e:
        _failed(req, r, "opendir", e)


cdef void _ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, size)
        s._h_readdir(r, ino, size, off, fi.fh)
    except BaseException as e:
        _failed(req, r, "readdir", e)


cdef void _ll_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_releasedir(r, ino, fi.fh)
    except BaseException as e:
        _failed(req, r, "releasedir", e)


cdef void _ll_statfs(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    cdef Request r = None
    try:
        s = _sess_of(req)
        r = _newreq(req, s, 0)
        s._h_statfs(r, ino)
    except BaseException as e:
        _failed(req, r, "statfs", e)


cdef void _ll_retrieve_reply(fuse_req_t req, void *cookie, fuse_ino_t ino, off_t offset,
                             fuse_bufvec *bufv) noexcept nogil:
    _retrieve_reply_py(req, <uint64_t><uintptr_t>cookie, ino, offset, bufv)
    fuse_reply_none(req)


cdef void _retrieve_reply_py(fuse_req_t req, uint64_t cookie, fuse_ino_t ino, off_t offset,
                             fuse_bufvec *bufv) noexcept with gil:
    cdef size_t n
    cdef ssize_t got
    cdef bytes data
    cdef char *p
    try:
        s = _sess_of(req)
        if s._h_retrieve_reply is None:
            return
        n = fuse_buf_size(bufv)
        data = PyBytes_FromStringAndSize(NULL, n)
        p = PyBytes_AS_STRING(data)
        with nogil:
            got = wcfs_bufvec_copy_to(p, n, bufv)
        if got < 0:
            raise _oserror(<int>-got, "retrieve_reply: copying the data")
        if <size_t>got != n:
            data = data[:got]
        s._h_retrieve_reply(cookie, ino, offset, data)
    except BaseException as e:
        _log.error("wcfs.fuse: retrieve_reply handler failed", exc_info=e)


# ---------------------------------------------------------------- session

def _loop_thread_main(Session s) -> None:
    s._run_loop()


def _escape_opt(str o) -> str:
    # fuse_opt splits -o on commas; a backslash escapes the next character
    return o.replace("\\", "\\\\").replace(",", "\\,")


cdef class Session:
    """A libfuse low-level session: mount, serve with a thread pool, notify, unmount."""
    cdef SessState *_ss
    cdef readonly object ops
    cdef readonly str mountpoint
    cdef readonly list options
    cdef bint _want_explicit
    cdef unsigned int _max_threads
    cdef unsigned int _max_idle
    cdef readonly ConnInfo conn       # set at INIT (before Operations.init)
    cdef object _init_error           # exception that made INIT fail
    cdef object _mu                   # threading.Lock: serializes mount/loop/unmount/close
    cdef bint _looping                # under _mu
    cdef bint _closed                 # under _mu
    cdef bint _exit_requested         # set by exit(), cleared when loop() returns
    cdef int _loop_rc
    cdef object _h_init, _h_destroy, _h_lookup, _h_forget, _h_getattr, _h_open, _h_read
    cdef object _h_write, _h_flush, _h_release, _h_opendir, _h_readdir, _h_releasedir
    cdef object _h_statfs, _h_retrieve_reply

    def __cinit__(self, *args, **kw):
        self._ss = <SessState *>calloc(1, sizeof(SessState))
        if self._ss == NULL:
            raise MemoryError()
        pthread_rwlock_init(&self._ss.life, NULL)
        pthread_mutex_init(&self._ss.wake_mu, NULL)
        self._ss.pysess = <PyObject *>self

    def __init__(self, ops, mountpoint, list options not None, *, bint explicit_inval_data=True,
                 unsigned int max_threads=16, unsigned int max_idle_threads=8):
        if max_threads < 1:
            raise ValueError("wcfs.fuse: max_threads must be >= 1")
        for o in options:
            if not isinstance(o, str) or "\0" in o:
                raise ValueError(f"wcfs.fuse: bad mount option {o!r}")
        self.ops = ops
        self.mountpoint = os.fspath(mountpoint)
        self.options = list(options)
        self._want_explicit = explicit_inval_data
        self._max_threads = max_threads
        self._max_idle = max_idle_threads
        self._mu = threading.Lock()
        for name in ("init", "destroy", "lookup", "forget", "getattr", "open", "read", "write",
                     "flush", "release", "opendir", "readdir", "releasedir", "statfs",
                     "retrieve_reply"):
            h = getattr(ops, name, None)
            if h is not None and not callable(h):
                raise TypeError(f"wcfs.fuse: {type(ops).__name__}.{name} is not callable")
        self._h_init = getattr(ops, "init", None)
        self._h_destroy = getattr(ops, "destroy", None)
        self._h_lookup = getattr(ops, "lookup", None)
        self._h_forget = getattr(ops, "forget", None)
        self._h_getattr = getattr(ops, "getattr", None)
        self._h_open = getattr(ops, "open", None)
        self._h_read = getattr(ops, "read", None)
        self._h_write = getattr(ops, "write", None)
        self._h_flush = getattr(ops, "flush", None)
        self._h_release = getattr(ops, "release", None)
        self._h_opendir = getattr(ops, "opendir", None)
        self._h_readdir = getattr(ops, "readdir", None)
        self._h_releasedir = getattr(ops, "releasedir", None)
        self._h_statfs = getattr(ops, "statfs", None)
        self._h_retrieve_reply = getattr(ops, "retrieve_reply", None)

    def __dealloc__(self):
        cdef fuse_session *se
        if self._ss == NULL:
            return
        se = self._ss.se
        self._ss.se = NULL
        self._ss.pysess = NULL
        if se != NULL:
            # never closed (a loop would hold a reference to us): unmount and free
            with nogil:
                fuse_session_unmount(se)
                fuse_session_destroy(se)
        pthread_rwlock_destroy(&self._ss.life)
        pthread_mutex_destroy(&self._ss.wake_mu)
        free(self._ss)
        self._ss = NULL

    def __repr__(self):
        return f"<wcfs.fuse.Session {self.mountpoint!r} fd={self.fd}>"

    @property
    def fd(self) -> int:
        """The /dev/fuse fd of the session (-1 before mount and after unmount)."""
        cdef int fd = -1
        with nogil:
            if _enter(self._ss) == 0:
                fd = fuse_session_fd(self._ss.se)
                _leave(self._ss)
        return fd

    # ------------------------------------------------------------ INIT

    cdef _negotiate(self, fuse_conn_info *conn):
        cdef unsigned int want
        cdef ConnInfo ci
        if conn.proto_major < 7 or (conn.proto_major == 7 and conn.proto_minor < 15):
            raise RuntimeError(
                f"wcfs.fuse: kernel FUSE protocol {conn.proto_major}.{conn.proto_minor} has no "
                f"notify store/retrieve (7.15+ is required)")
        want = conn.want
        # The kernel must never drop cached data on its own (AUTO_INVAL_DATA);
        # splice and readdirplus are not used by this binding.
        want &= ~(<unsigned int>(FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_SPLICE_READ
                                 | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE
                                 | FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO))
        if conn.capable & FUSE_CAP_ASYNC_READ:
            want |= FUSE_CAP_ASYNC_READ
        if self._want_explicit:
            if conn.capable & FUSE_CAP_EXPLICIT_INVAL_DATA:
                want |= FUSE_CAP_EXPLICIT_INVAL_DATA
            else:
                _log.warning(
                    "wcfs.fuse: !!! the kernel does not support FUSE_CAP_EXPLICIT_INVAL_DATA "
                    "(Linux >= 5.2 needed): it will drop a file's whole page cache whenever "
                    "the file's size changes -- performance will be AWFUL !!!")
        conn.want = want
        # max_write and max_readahead: libfuse initialised them to the largest it
        # supports (its buffer size, 1 MiB on 3.14; the kernel's offer) -- keep them.
        ci = ConnInfo.__new__(ConnInfo)
        ci.proto_major = conn.proto_major
        ci.proto_minor = conn.proto_minor
        ci.capable = conn.capable
        ci.want = conn.want
        ci.max_write = conn.max_write
        ci.max_read = conn.max_read
        ci.max_readahead = conn.max_readahead
        ci.max_background = conn.max_background
        ci.congestion_threshold = conn.congestion_threshold
        ci.explicit_inval_data = (conn.want & FUSE_CAP_EXPLICIT_INVAL_DATA) != 0
        self.conn = ci
        _log.debug("wcfs.fuse: negotiated %r", ci)
        if self._h_init is not None:
            self._h_init(ci)

    # ------------------------------------------------------------ lifecycle

    def mount(self) -> None:
        """Create the libfuse session and mount it; raises OSError on failure."""
        cdef fuse_lowlevel_ops ll
        cdef fuse_args args
        cdef fuse_session *se
        cdef char **argv
        cdef char errbuf[1024]
        cdef int rc, err
        cdef bytes bmnt = os.fsencode(self.mountpoint)
        cdef const char *cmnt = bmnt
        with self._mu:
            if self._closed:
                raise RuntimeError("wcfs.fuse: mount: session is closed")
            if self._ss.se != NULL:
                raise RuntimeError("wcfs.fuse: mount: already mounted")
            _ensure_dispatcher()

            memset(&ll, 0, sizeof(ll))
            ll.init = _ll_init
            ll.destroy = _ll_destroy
            ll.retrieve_reply = _ll_retrieve_reply
            if self._h_lookup is not None:
                ll.lookup = _ll_lookup
            if self._h_forget is not None:
                ll.forget = _ll_forget
                ll.forget_multi = _ll_forget_multi
            if self._h_getattr is not None:
                ll.getattr = _ll_getattr
            if self._h_open is not None:
                ll.open = _ll_open
            if self._h_read is not None:
                ll.read = _ll_read
            if self._h_write is not None:
                ll.write = _ll_write
            if self._h_flush is not None:
                ll.flush = _ll_flush
            if self._h_release is not None:
                ll.release = _ll_release
            if self._h_opendir is not None:
                ll.opendir = _ll_opendir
            if self._h_readdir is not None:
                ll.readdir = _ll_readdir
            if self._h_releasedir is not None:
                ll.releasedir = _ll_releasedir
            if self._h_statfs is not None:
                ll.statfs = _ll_statfs

            bargv = [b"wcfs"]
            if self.options:
                bargv += [b"-o", ",".join(_escape_opt(o) for o in self.options).encode()]
            argv = <char **>calloc(len(bargv) + 1, sizeof(char *))
            if argv == NULL:
                raise MemoryError()
            for i, a in enumerate(bargv):
                argv[i] = <char *>(<bytes>a)
            args.argc = len(bargv)
            args.argv = argv
            args.allocated = 0
            wcfs_take_lasterr(errbuf, sizeof(errbuf))     # clear stale messages
            se = fuse_session_new(&args, &ll, sizeof(ll), <void *>self._ss)
            fuse_opt_free_args(&args)
            free(argv)
            if se == NULL:
                wcfs_take_lasterr(errbuf, sizeof(errbuf))
                raise OSError(_errno.EINVAL, f"wcfs.fuse: fuse_session_new(options={self.options!r}) "
                                             f"failed: {errbuf.decode(errors='replace')}")
            with nogil:
                errno = 0
                rc = fuse_session_mount(se, cmnt)
                err = errno
                if rc != 0:
                    fuse_session_destroy(se)
            if rc != 0:
                wcfs_take_lasterr(errbuf, sizeof(errbuf))
                raise OSError(err or _errno.EIO,
                              f"wcfs.fuse: mounting {self.mountpoint!r} failed: "
                              f"{errbuf.decode(errors='replace') or os.strerror(err or _errno.EIO)}")
            with nogil:
                pthread_rwlock_wrlock(&self._ss.life)
                self._ss.se = se
                pthread_rwlock_unlock(&self._ss.life)

    def loop(self) -> None:
        """Serve requests with libfuse's thread pool until unmount or exit().

        The pool runs in a helper thread; the caller waits interruptibly, so signal
        handlers of the calling (e.g. main) thread still run: if waiting raises (e.g.
        KeyboardInterrupt), the loop is stopped and the exception propagates.
        Raises RuntimeError if INIT failed (e.g. kernel protocol < 7.15), OSError if
        the loop failed.
        """
        with self._mu:
            if self._ss.se == NULL:
                raise RuntimeError("wcfs.fuse: loop: not mounted")
            if self._looping:
                raise RuntimeError("wcfs.fuse: loop: already running")
            self._looping = True
            self._init_error = None
        _ensure_dispatcher()
        if self._exit_requested:
            self.exit()         # exit() came before loop(): return at once
        t = threading.Thread(target=_loop_thread_main, args=(self,), name="wcfs.fuse-loop",
                             daemon=True)
        try:
            t.start()
            try:
                while t.is_alive():
                    t.join(0.2)
                    if self._exit_requested and t.is_alive():
                        # the wake-up signal may have hit before libfuse went to
                        # sleep: repeat it until the loop is gone
                        self._wake()
            except BaseException:
                self.exit()
                while t.is_alive():
                    t.join(0.2)
                    if t.is_alive():
                        self._wake()
                raise
        finally:
            with self._mu:
                self._looping = False
                self._exit_requested = False
        if self._init_error is not None:
            raise RuntimeError(f"wcfs.fuse: session init failed: {self._init_error}") \
                from self._init_error
        if self._loop_rc < 0:
            raise _oserror(-self._loop_rc, "session loop")

    cdef _run_loop(self):
        cdef fuse_loop_config *cfg = fuse_loop_cfg_create()
        cdef int rc
        if cfg == NULL:
            self._loop_rc = -ENOMEM
            return
        fuse_loop_cfg_set_clone_fd(cfg, 1)
        fuse_loop_cfg_set_max_threads(cfg, self._max_threads)
        fuse_loop_cfg_set_idle_threads(cfg, self._max_idle)
        with nogil:
            wcfs_unblock_wake_signal()
            pthread_mutex_lock(&self._ss.wake_mu)
            self._ss.loop_tid = pthread_self()
            self._ss.loop_running = True
            pthread_mutex_unlock(&self._ss.wake_mu)
            rc = fuse_session_loop_mt(self._ss.se, cfg)
            pthread_mutex_lock(&self._ss.wake_mu)
            self._ss.loop_running = False
            pthread_mutex_unlock(&self._ss.wake_mu)
        fuse_loop_cfg_destroy(cfg)
        self._loop_rc = rc

    cdef void _wake(self) noexcept:
        # Interrupt the loop thread's sem_wait so it sees the exit flag (see
        # _fuse_helpers.h); the thread id is valid while loop_running.
        cdef int sig = wcfs_wake_signal()
        if sig < 0:
            return
        with nogil:
            pthread_mutex_lock(&self._ss.wake_mu)
            if self._ss.loop_running:
                pthread_kill(self._ss.loop_tid, sig)
            pthread_mutex_unlock(&self._ss.wake_mu)

    def exit(self) -> None:
        """Make loop() return soon (callable from any thread, also from handlers)."""
        self._exit_requested = True
        with nogil:
            if _enter(self._ss) == 0:
                fuse_session_exit(self._ss.se)
                _leave(self._ss)
        self._wake()

    def unmount(self) -> None:
        """Unmount (lazily, like fusermount3 -u -z); idempotent.  A running loop()
        returns once the kernel lets go of the connection."""
        with nogil:
            pthread_rwlock_wrlock(&self._ss.life)
            if self._ss.se != NULL:
                fuse_session_unmount(self._ss.se)
            pthread_rwlock_unlock(&self._ss.life)

    def close(self) -> None:
        """Unmount if needed and destroy the session (Operations.destroy runs).

        Requests still pending become dead: replying to them returns False."""
        cdef fuse_session *se
        with self._mu:
            if self._looping:
                raise RuntimeError("wcfs.fuse: close: loop() is still running")
            if self._closed:
                return
            self._closed = True
        self.unmount()
        with nogil:
            pthread_rwlock_wrlock(&self._ss.life)
            se = self._ss.se
            self._ss.se = NULL
            pthread_rwlock_unlock(&self._ss.life)
            if se != NULL:
                fuse_session_destroy(se)

    # ------------------------------------------------------------ notifications

    def notify_inval_inode(self, fuse_ino_t ino, off_t off, off_t length) -> None:
        """Drop [off, off+length) of ino's page cache (length 0: to EOF; off -1: attributes only)."""
        cdef int rc = -ENOTCONN
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_lowlevel_notify_inval_inode(self._ss.se, ino, off, length)
                _leave(self._ss)
        if rc < 0:
            raise _oserror(-rc, f"notify_inval_inode(ino={ino}, off={off}, len={length})")

    def notify_inval_entry(self, fuse_ino_t parent, bytes name not None) -> None:
        cdef int rc = -ENOTCONN
        cdef const char *cname = name
        cdef size_t n = len(name)
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_lowlevel_notify_inval_entry(self._ss.se, parent, cname, n)
                _leave(self._ss)
        if rc < 0:
            raise _oserror(-rc, f"notify_inval_entry(parent={parent}, name={name!r})")

    def notify_store(self, fuse_ino_t ino, off_t off, data) -> None:
        """Put data (any contiguous buffer, not copied) into ino's page cache at off."""
        cdef Py_buffer view
        cdef int rc = -ENOTCONN
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                if _enter(self._ss) == 0:
                    rc = wcfs_notify_store(self._ss.se, ino, off, view.buf, <size_t>view.len)
                    _leave(self._ss)
        finally:
            PyBuffer_Release(&view)
        if rc < 0:
            raise _oserror(-rc, f"notify_store(ino={ino}, off={off}, len={len(data)})")

    def notify_retrieve(self, fuse_ino_t ino, off_t off, size_t size) -> int:
        """Ask the kernel for ino's cached [off, off+size); returns the cookie that
        Operations.retrieve_reply(cookie, ino, offset, data) will get.  The kernel
        returns at most max_write bytes and stops at the first uncached page."""
        global _next_cookie
        cdef int rc = -ENOTCONN
        cdef uint64_t cookie
        _next_cookie += 1
        cookie = _next_cookie
        with nogil:
            if _enter(self._ss) == 0:
                rc = fuse_lowlevel_notify_retrieve(self._ss.se, ino, size, off,
                                                   <void *><uintptr_t>cookie)
                _leave(self._ss)
        if rc < 0:
            raise _oserror(-rc, f"notify_retrieve(ino={ino}, off={off}, size={size})")
        return cookie
