/*
 * pyscone's libc layer (DESIGN.md section 5): the file entry points of the C library,
 * interposed for every shared library in the enclave process (SQLite's unix VFS first).
 *
 * Theory of operation
 * -------------------
 * The launcher preloads this library (LD_PRELOAD, the only environment the measuring
 * loader accepts), so the dynamic linker binds every other library's `open`, `read`,
 * `fstat`, ... to the functions below.  Until the runtime arms it, each one forwards to
 * the next definition (libc's), found once with dlsym(RTLD_NEXT).
 *
 * Armed (after lockdown), a call goes to ONE dispatch callback that the enclave runtime
 * registered (a ctypes function, pyscone/enclave/stdlib/clib.py).  It implements the call
 * with the Python layer (stdlib/files.py, fdops.py, the FS shield), so there is one
 * implementation of the semantics and of the Iago checks, not two.  It returns the result,
 * or -errno.  These calls still forward to libc (where the barrier refuses them, EPERM,
 * exactly as before the layer existed):
 *
 *  - calls made by the interpreter itself (its executable or libpython): the Python layer
 *    already interposes them one level up, where the runtime's own raw `posix` calls must
 *    keep meeting the barrier;
 *  - calls made while the dispatch is running on this thread (the runtime's own code must
 *    never re-enter itself through C);
 *
 * and these are refused (EPERM) without a dispatch:
 *
 *  - calls from any OS thread but the enclave's own (a thread a C library started before
 *    lockdown): the rings have a single producer and the scheduler one thread;
 *  - reads and writes of fds 0..2: the console shield owns them, and a C library must not
 *    write around it in plaintext.  (With the shield on, glibc's stdout and stderr are
 *    replaced by streams into it: pyscone_shim_console in shim_stdio.c.)
 *
 * The runtime's own descriptors (the doorbells, the epoll set) are used through
 * eventfd_read/eventfd_write/epoll_wait, which this library does not interpose, so no fd
 * number is forwarded on trust: an fd number from a C library is always the host's (or a
 * virtual fd of the FS shield), even when it equals a doorbell's number.
 *
 * This file is the core: the routing, the one call to the runtime, the answers from memory
 * and the file entry points.  C stdio is in shim_stdio.c, sockets, poll and getaddrinfo in
 * shim_net.c; shim.h holds what they share (the call numbers, route/call/refuse, ROUTE).
 */
#include "shim.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PYSCONE_SHIM_ABI 2

dispatch_fn dispatch;
__thread int enclave_thread; /* set on the thread that armed the shim, only */
__thread int in_dispatch;
unsigned long foreign_calls;
static unsigned long dispatched; /* calls that went to the runtime */
/* The interpreter's executable segments: calls from there are the Python layer's business. */
#define MAX_RANGES 8
static uintptr_t range_lo[MAX_RANGES], range_hi[MAX_RANGES];
static int nranges;
/* The interpreter's own API (found at prepare): the GIL, and its cyclic garbage collector,
 * which must not run during a call from C.  A collection there may run a finalizer that
 * closes a forgotten sqlite3 connection, and SQLite closes files under its global VFS mutex,
 * which it also holds around calls that arrive here (the fstat after an open): on one OS
 * thread, a deadlock.  It is turned off before the callback's own allocations (ctypes builds
 * an argument tuple, which can trigger a collection) and back on after. */
static int (*py_gil_ensure)(void);
static void (*py_gil_release)(int);
static int (*py_gc_disable)(void);
static int (*py_gc_enable)(void);

struct libc_fns real;

void *next(const char *name) { return dlsym(RTLD_NEXT, name); }

__attribute__((constructor)) static void resolve(void)
{
    /* Before main: the libc functions this library stands in front of. */
    real.open = next("open64");
    real.openat = next("openat64");
    real.close = next("close");
    real.read = next("read");
    real.write = next("write");
    real.pread = next("pread64");
    real.pwrite = next("pwrite64");
    real.lseek = next("lseek64");
    real.fstat = next("fstat64");
    real.stat = next("stat64");
    real.lstat = next("lstat64");
    real.fsync = next("fsync");
    real.fdatasync = next("fdatasync");
    real.ftruncate = next("ftruncate64");
    real.fcntl = next("fcntl64");
    real.unlink = next("unlink");
    real.access = next("access");
    real.mkdir = next("mkdir");
    real.rmdir = next("rmdir");
    real.getcwd = next("getcwd");
    real.readlink = next("readlink");
    real.fchmod = next("fchmod");
    real.fchown = next("fchown");
    real.mmap = next("mmap64");
    real.rename = next("rename");
    real.flock = next("flock");
    real.socket = next("socket");
    real.fopen = next("fopen64");
    real.fdopen = next("fdopen");
    real.fileno = next("fileno");
}

static int add_range(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    if (info->dlpi_addr != (uintptr_t)data)
        return 0;
    for (int i = 0; i < info->dlpi_phnum && nranges < MAX_RANGES; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
            range_lo[nranges] = info->dlpi_addr + ph->p_vaddr;
            range_hi[nranges] = range_lo[nranges] + ph->p_memsz;
            nranges++;
        }
    }
    return 1;
}

/* Exported to the runtime ------------------------------------------------------------ */

int pyscone_shim_abi(void) { return PYSCONE_SHIM_ABI; }

/* Before lockdown: find the interpreter's code (the object that defines Py_BytesMain). */
int pyscone_shim_prepare(void)
{
    Dl_info info;
    struct link_map *lm = NULL;
    void *sym = dlsym(RTLD_DEFAULT, "Py_BytesMain");
    nranges = 0;
    py_gil_ensure = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    py_gil_release = (void (*)(int))dlsym(RTLD_DEFAULT, "PyGILState_Release");
    py_gc_disable = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGC_Disable");
    py_gc_enable = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGC_Enable");
    if (sym == NULL || !py_gil_ensure || !py_gil_release || !py_gc_disable || !py_gc_enable)
        return -1;
    /* The link map's l_addr is the load bias, which dl_iterate_phdr calls dlpi_addr. */
    if (dladdr1(sym, &info, (void **)&lm, RTLD_DL_LINKMAP) == 0 || lm == NULL)
        return -1;
    dl_iterate_phdr(add_range, (void *)lm->l_addr);
    return nranges;
}

/* After lockdown: from now on calls from other libraries go to `fn`. */
void pyscone_shim_arm(dispatch_fn fn)
{
    enclave_thread = 1;
    dispatch = fn;
}

void pyscone_shim_disarm(void) { dispatch = NULL; }

/* Calls refused because they came from another OS thread. */
unsigned long pyscone_shim_foreign_calls(void) { return foreign_calls; }

/* Calls that went to the runtime's callback. */
unsigned long pyscone_shim_dispatched(void) { return dispatched; }

/* The routing decision ------------------------------------------------------------------ */

enum route route(const void *caller)
{
    if (dispatch == NULL || in_dispatch)
        return FORWARD;
    uintptr_t pc = (uintptr_t)caller;
    for (int i = 0; i < nranges; i++)
        if (pc >= range_lo[i] && pc < range_hi[i])
            return FORWARD;
    if (!enclave_thread) {
        __atomic_add_fetch(&foreign_calls, 1, __ATOMIC_RELAXED);
        return REFUSE;
    }
    return DISPATCH;
}

/* Whether a call may change what the kept answers say (see "Answers from the enclave's own
 * memory"): the counter moves before it and after it. */
static int changes(int op, long long a)
{
    switch (op) {
    case C_OPEN: case C_OPENAT: return (a & (O_CREAT | O_TRUNC)) != 0;
    case C_WRITE: case C_PWRITE: case C_FTRUNCATE: case C_UNLINK: case C_MKDIR: case C_RMDIR:
    case C_RENAME: case C_FCHMOD: case C_FCHOWN: case C_BIND: return 1; /* (an AF_UNIX bind makes a file) */
    default: return 0;
    }
}

static void changed(void);
void pyscone_shim_forget(int fd);

long long call(int op, long long a, long long b, long long c, const void *p, void *q)
{
    int saved = errno;
    int changing = changes(op, a);
    dispatched++;
    in_dispatch = 1;
    int gil = py_gil_ensure();
    int collecting = py_gc_disable();
    long long r = dispatch(op, a, b, c, p, q);
    if (collecting)
        py_gc_enable();
    py_gil_release(gil);
    in_dispatch = 0;
    if (changing)
        changed();
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    errno = saved;
    return r;
}

int refuse(void)
{
    errno = EPERM;
    return -1;
}

static long long stat_out(long long r, struct stat *st, const long long f[13])
{
    if (r < 0)
        return r;
    memset(st, 0, sizeof *st);
    st->st_dev = (dev_t)f[0];
    st->st_ino = (ino_t)f[1];
    st->st_nlink = (nlink_t)f[2];
    st->st_mode = (mode_t)f[3];
    st->st_uid = (uid_t)f[4];
    st->st_gid = (gid_t)f[5];
    st->st_rdev = (dev_t)f[6];
    st->st_size = (off_t)f[7];
    st->st_blksize = (blksize_t)f[8];
    st->st_blocks = (blkcnt_t)f[9];
    st->st_atim.tv_sec = f[10] / 1000000000;
    st->st_atim.tv_nsec = f[10] % 1000000000;
    st->st_mtim.tv_sec = f[11] / 1000000000;
    st->st_mtim.tv_nsec = f[11] % 1000000000;
    st->st_ctim.tv_sec = f[12] / 1000000000;
    st->st_ctim.tv_nsec = f[12] % 1000000000;
    return 0;
}

/* Answers from the enclave's own memory ---------------------------------------------------
 *
 * Every SQLite read transaction makes eight calls: four record locks, a stat of the journal
 * and of the WAL (absent), a 16-byte read of the change counter and an fstat.  Natively they
 * cost about 0.4 us each; through the callback each is a trip into Python.  For the FS
 * shield's files the runtime knows every answer ahead (nothing outside this process can hold
 * a lock on them or change them), so the shim keeps the answers it was given, and gives them
 * again while nothing has changed:
 *
 *  - record locks (F_SETLK/F_SETLKW/F_GETLK and the OFD forms) on an fd the runtime marked
 *    "local" (pyscone_shim_local: its POSIX locks are granted by the Python layer without
 *    any check beyond the arguments', fdops._lock) are granted here, after the same checks;
 *  - fstat of a local fd, and a small pread (at most FAST_READ bytes) of a local fd at the
 *    same offset and size as the last one, return what the runtime returned last time;
 *  - stat/lstat of an absolute path the runtime answered ENOENT *and* marked as its own to
 *    decide (a path in an FS-shield region: field 0 of the stat buffer set to 1) are ENOENT.
 *
 * "Nothing has changed" is one counter, pyscone_shim_gen, which the Python layer bumps on
 * every change to a file's contents, metadata or the namespace (files.py calls its
 * on_change hooks at each such call), and which the shim bumps too before each of its own
 * changing calls.  An answer is kept with the value the counter had before it was asked for,
 * so a change made while it was computed makes it stale at once.  The host is never asked
 * and never believed here: the kept answers are the runtime's own, computed after its checks. */

#define LOCAL_MAX 64
#define FAST_READ 64
#define ABSENT_MAX 16
#define ABSENT_PATH 256

uint64_t pyscone_shim_gen = 1; /* 0 marks an empty cache entry */

struct local {
    int fd; /* -1: free */
    uint64_t st_gen;
    long long st[13];
    uint64_t rd_gen;
    off_t rd_off;
    size_t rd_len;
    ssize_t rd_got;
    unsigned char rd[FAST_READ];
};
static struct local locals[LOCAL_MAX];
static int nlocals; /* entries in use are locals[0..nlocals) with fd >= 0 */
static struct {
    uint64_t gen;
    int follow;
    char path[ABSENT_PATH];
} absent[ABSENT_MAX];
static int absent_next;
static unsigned long fast_answers;

static struct local *local_of(int fd)
{
    for (int i = 0; i < nlocals; i++)
        if (locals[i].fd == fd)
            return &locals[i];
    return NULL;
}

/* The runtime: locks on `fd` are this process's alone, and so is every answer about it. */
void pyscone_shim_local(int fd)
{
    struct local *l = local_of(fd);
    if (l == NULL) {
        for (int i = 0; i < nlocals && l == NULL; i++)
            if (locals[i].fd < 0)
                l = &locals[i];
        if (l == NULL && nlocals < LOCAL_MAX)
            l = &locals[nlocals++];
        if (l == NULL)
            return; /* no room: the fd simply takes the slow path */
    }
    memset(l, 0, sizeof *l);
    l->fd = fd;
}

/* The runtime: `fd` was closed (by anyone). */
void pyscone_shim_forget(int fd)
{
    struct local *l = local_of(fd);
    if (l != NULL)
        l->fd = -1;
}

unsigned long pyscone_shim_fast_answers(void) { return fast_answers; }

static void changed(void) { __atomic_add_fetch(&pyscone_shim_gen, 1, __ATOMIC_RELAXED); }

static uint64_t gen_now(void) { return __atomic_load_n(&pyscone_shim_gen, __ATOMIC_RELAXED); }

static int absent_slot(const char *path, int follow)
{
    if (path == NULL || path[0] != '/' || strnlen(path, ABSENT_PATH) >= ABSENT_PATH)
        return -2; /* never kept */
    uint64_t g = gen_now();
    for (int i = 0; i < ABSENT_MAX; i++)
        if (absent[i].gen == g && absent[i].follow == follow && strcmp(absent[i].path, path) == 0)
            return i;
    return -1;
}

/* stat/lstat: ENOENT from memory, or the runtime's answer (kept if it says so). */
static int stat_call(const char *path, struct stat *st, int follow)
{
    int slot = absent_slot(path, follow);
    if (slot >= 0) {
        fast_answers++;
        errno = ENOENT;
        return -1;
    }
    long long f[13] = {0};
    uint64_t g = gen_now();
    int r = (int)stat_out(call(C_STAT, follow, 0, 0, path, f), st, f);
    if (r < 0 && errno == ENOENT && f[0] == 1 && slot == -1) {
        int i = absent_next++ % ABSENT_MAX;
        strcpy(absent[i].path, path);
        absent[i].follow = follow;
        absent[i].gen = g;
    }
    return r;
}

/* A record lock on a local fd: granted (F_GETLK: "nobody would block it"), after the Python
 * layer's checks of the arguments.  Returns 1 if answered here. */
static int lock_here(int fd, int cmd, struct flock *fl, int *result)
{
    if (local_of(fd) == NULL || fl == NULL)
        return 0;
    int getlk = cmd == F_GETLK || cmd == F_OFD_GETLK;
    int type_ok = fl->l_type == F_RDLCK || fl->l_type == F_WRLCK || (!getlk && fl->l_type == F_UNLCK);
    if (!type_ok || fl->l_whence < 0 || fl->l_whence > 2) {
        errno = EINVAL;
        *result = -1;
        return 1;
    }
    if (getlk)
        fl->l_type = F_UNLCK;
    fast_answers++;
    *result = 0;
    return 1;
}

static int fstat_call(int fd, struct stat *st)
{
    struct local *l = local_of(fd);
    uint64_t g = gen_now();
    if (l != NULL && l->st_gen == g) {
        fast_answers++;
        return (int)stat_out(0, st, l->st);
    }
    long long f[13];
    long long r = call(C_FSTAT, fd, 0, 0, NULL, f);
    if (r >= 0 && (l = local_of(fd)) != NULL) {
        memcpy(l->st, f, sizeof f);
        l->st_gen = g;
    }
    return (int)stat_out(r, st, f);
}

static ssize_t pread_call(int fd, void *buf, size_t n, off_t off)
{
    struct local *l = n <= FAST_READ ? local_of(fd) : NULL;
    uint64_t g = gen_now();
    if (l != NULL && l->rd_gen == g && l->rd_off == off && l->rd_len == n) {
        fast_answers++;
        memcpy(buf, l->rd, (size_t)l->rd_got);
        return l->rd_got;
    }
    ssize_t r = (ssize_t)call(C_PREAD, fd, (long long)n, off, NULL, buf);
    if (r >= 0 && l != NULL && (l = local_of(fd)) != NULL) {
        memcpy(l->rd, buf, (size_t)r);
        l->rd_got = r;
        l->rd_off = off;
        l->rd_len = n;
        l->rd_gen = g;
    }
    return r;
}

/* The interposed entry points ----------------------------------------------------------- */

static int needs_mode(int flags) { return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE; }

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    ROUTE(real.open(path, flags, mode));
    return (int)call(C_OPEN, flags, mode, 0, path, NULL);
}
ALIAS(open64, open);

/* What _FORTIFY_SOURCE turns an open without O_CREAT into. */
int __open_2(const char *path, int flags)
{
    ROUTE(real.open(path, flags));
    return (int)call(C_OPEN, flags, 0, 0, path, NULL);
}
ALIAS(__open64_2, __open_2);

int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    ROUTE(real.openat(dirfd, path, flags, mode));
    return (int)call(C_OPENAT, flags, mode, dirfd, path, NULL);
}
ALIAS(openat64, openat);

int close(int fd)
{
    ROUTE(real.close(fd));
    pyscone_shim_forget(fd);
    return (int)call(C_CLOSE, fd, 0, 0, NULL, NULL);
}

static ssize_t read_from(const void *caller, int fd, void *buf, size_t n)
{
    ROUTE_FROM(caller, real.read(fd, buf, n));
    if (fd >= 0 && fd <= 2)
        return refuse();
    return (ssize_t)call(C_READ, fd, (long long)n, 0, NULL, buf);
}

ssize_t read(int fd, void *buf, size_t n) { return read_from(CALLER, fd, buf, n); }

ssize_t write(int fd, const void *buf, size_t n)
{
    ROUTE(real.write(fd, buf, n));
    if (fd >= 0 && fd <= 2)
        return refuse();
    return (ssize_t)call(C_WRITE, fd, (long long)n, 0, buf, NULL);
}

static ssize_t pread_from(const void *caller, int fd, void *buf, size_t n, off_t off)
{
    ROUTE_FROM(caller, real.pread(fd, buf, n, off));
    return pread_call(fd, buf, n, off);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) { return pread_from(CALLER, fd, buf, n, off); }
ALIAS(pread64, pread);

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    ROUTE(real.pwrite(fd, buf, n, off));
    return (ssize_t)call(C_PWRITE, fd, (long long)n, off, buf, NULL);
}
ALIAS(pwrite64, pwrite);

off_t lseek(int fd, off_t off, int whence)
{
    ROUTE(real.lseek(fd, off, whence));
    return (off_t)call(C_LSEEK, fd, off, whence, NULL, NULL);
}
ALIAS(lseek64, lseek);

int fstat(int fd, struct stat *st)
{
    ROUTE(real.fstat(fd, st));
    return fstat_call(fd, st);
}
ALIAS(fstat64, fstat);

int stat(const char *path, struct stat *st)
{
    ROUTE(real.stat(path, st));
    return stat_call(path, st, 1);
}
ALIAS(stat64, stat);

int lstat(const char *path, struct stat *st)
{
    ROUTE(real.lstat(path, st));
    return stat_call(path, st, 0);
}
ALIAS(lstat64, lstat);

int fsync(int fd)
{
    ROUTE(real.fsync(fd));
    return (int)call(C_FSYNC, fd, 0, 0, NULL, NULL);
}

int fdatasync(int fd)
{
    ROUTE(real.fdatasync(fd));
    return (int)call(C_FSYNC, fd, 0, 0, NULL, NULL);
}

int ftruncate(int fd, off_t length)
{
    ROUTE(real.ftruncate(fd, length));
    return (int)call(C_FTRUNCATE, fd, length, 0, NULL, NULL);
}
ALIAS(ftruncate64, ftruncate);

/* fcntl's third argument is an int or a pointer: both travel as one register on x86-64.
 * Locks travel as (l_type, l_whence, l_start, l_len, l_pid) in q, written back for F_GETLK. */
int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    ROUTE(real.fcntl(fd, cmd, arg));
    if (cmd == F_GETLK || cmd == F_SETLK || cmd == F_SETLKW || cmd == F_OFD_GETLK || cmd == F_OFD_SETLK ||
        cmd == F_OFD_SETLKW) {
        struct flock *fl = (struct flock *)arg;
        if (fl == NULL) {
            errno = EFAULT;
            return -1;
        }
        int here;
        if (lock_here(fd, cmd, fl, &here))
            return here;
        long long lk[5] = {fl->l_type, fl->l_whence, fl->l_start, fl->l_len, fl->l_pid};
        long long r = call(C_FCNTL, fd, cmd, 0, NULL, lk);
        if (r >= 0 && (cmd == F_GETLK || cmd == F_OFD_GETLK)) {
            fl->l_type = (short)lk[0];
            fl->l_whence = (short)lk[1];
            fl->l_start = (off_t)lk[2];
            fl->l_len = (off_t)lk[3];
            fl->l_pid = (pid_t)lk[4];
        }
        return (int)r;
    }
    return (int)call(C_FCNTL, fd, cmd, arg, NULL, NULL);
}
ALIAS(fcntl64, fcntl);

int unlink(const char *path)
{
    ROUTE(real.unlink(path));
    return (int)call(C_UNLINK, 0, 0, 0, path, NULL);
}

int access(const char *path, int mode)
{
    ROUTE(real.access(path, mode));
    return (int)call(C_ACCESS, mode, 0, 0, path, NULL);
}

int mkdir(const char *path, mode_t mode)
{
    ROUTE(real.mkdir(path, mode));
    return (int)call(C_MKDIR, mode, 0, 0, path, NULL);
}

int rmdir(const char *path)
{
    ROUTE(real.rmdir(path));
    return (int)call(C_RMDIR, 0, 0, 0, path, NULL);
}

static char *getcwd_from(const void *caller, char *buf, size_t size)
{
    enum route how = route(caller);
    if (how == FORWARD)
        return real.getcwd(buf, size);
    if (how == REFUSE) {
        errno = EPERM;
        return NULL;
    }
    char *own = NULL;
    if (buf == NULL) { /* glibc's extension: a buffer of `size` bytes, or as large as needed */
        size = size ? size : 4096;
        buf = own = malloc(size);
        if (buf == NULL)
            return NULL;
    }
    if (call(C_GETCWD, (long long)size, 0, 0, NULL, buf) < 0) {
        int e = errno;
        free(own);
        errno = e;
        return NULL;
    }
    return buf;
}

char *getcwd(char *buf, size_t size) { return getcwd_from(CALLER, buf, size); }

static ssize_t readlink_from(const void *caller, const char *path, char *buf, size_t size)
{
    ROUTE_FROM(caller, real.readlink(path, buf, size));
    return (ssize_t)call(C_READLINK, (long long)size, 0, 0, path, buf);
}

ssize_t readlink(const char *path, char *buf, size_t size) { return readlink_from(CALLER, path, buf, size); }

int fchmod(int fd, mode_t mode)
{
    ROUTE(real.fchmod(fd, mode));
    return (int)call(C_FCHMOD, fd, mode, 0, NULL, NULL);
}

int fchown(int fd, uid_t uid, gid_t gid)
{
    ROUTE(real.fchown(fd, uid, gid));
    return (int)call(C_FCHOWN, fd, uid, gid, NULL, NULL);
}

/* What _FORTIFY_SOURCE makes of read/pread/readlink/getcwd when the buffer's size is known:
 * the same calls, after glibc's own overflow check (which aborts the process, as natively). */

ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    if (n > buflen)
        __chk_fail();
    return read_from(CALLER, fd, buf, n);
}

ssize_t __pread64_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
    if (n > buflen)
        __chk_fail();
    return pread_from(CALLER, fd, buf, n, off);
}
ALIAS(__pread_chk, __pread64_chk);

ssize_t __readlink_chk(const char *path, char *buf, size_t n, size_t buflen)
{
    if (n > buflen)
        __chk_fail();
    return readlink_from(CALLER, path, buf, n);
}

char *__getcwd_chk(char *buf, size_t size, size_t buflen)
{
    if (size > buflen)
        __chk_fail();
    return getcwd_from(CALLER, buf, size);
}

/* p: the old path, q: the new one (replaced if it exists, as rename(2) does). */
int rename(const char *from, const char *to)
{
    ROUTE(real.rename(from, to));
    return (int)call(C_RENAME, 0, 0, 0, from, (void *)to);
}

int flock(int fd, int operation)
{
    ROUTE(real.flock(fd, operation));
    return (int)call(C_FLOCK, fd, operation, 0, NULL, NULL);
}

/* Libraries built against glibc < 2.33 (manylinux2014 wheels: lxml's libxml2) call stat
 * through these versioned names, and libxml2 hands zlib a dup of every file it opens
 * (gzdopen): without them both met the barrier and lxml.etree.parse(path) failed with EPERM.
 * `ver` is _STAT_VER_LINUX, whose struct stat is the one above on x86-64. */
static int (*real_dup)(int);
__attribute__((constructor)) static void resolve_compat(void) { real_dup = next("dup"); }

int __xstat64(int ver, const char *path, struct stat *st)
{
    (void)ver;
    ROUTE(real.stat(path, st));
    long long f[13];
    return (int)stat_out(call(C_STAT, 1, 0, 0, path, f), st, f);
}
ALIAS(__xstat, __xstat64);

int __lxstat64(int ver, const char *path, struct stat *st)
{
    (void)ver;
    ROUTE(real.lstat(path, st));
    long long f[13];
    return (int)stat_out(call(C_STAT, 0, 0, 0, path, f), st, f);
}
ALIAS(__lxstat, __lxstat64);

int __fxstat64(int ver, int fd, struct stat *st)
{
    (void)ver;
    ROUTE(real.fstat(fd, st));
    long long f[13];
    return (int)stat_out(call(C_FSTAT, fd, 0, 0, NULL, f), st, f);
}
ALIAS(__fxstat, __fxstat64);

/* A dup is a second name for the same open file in the Python layer (stdlib/dups.py). */
int dup(int fd)
{
    ROUTE(real_dup(fd));
    return (int)call(C_DUP, fd, 0, 0, NULL, NULL);
}

/* A socket.  Sockets from C (libpq, libuv) are not covered yet: the runtime refuses them, as the
 * barrier would, but says once on the console which library asked and why. */
int socket(int domain, int type, int protocol)
{
    ROUTE(real.socket(domain, type, protocol));
    return (int)call(C_SOCKET, domain, type, protocol, NULL, NULL);
}

/* A file mapping.  The enclave cannot map a host file (its fds are the host's); the runtime
 * may answer 0 ("serve it from enclave memory": SQLite's WAL index, the -shm file, which only
 * this process uses), and the mapping is then shared anonymous memory, zero-filled as SQLite's
 * recovery expects of a fresh index.  Anonymous mappings never reach the runtime. */
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if ((flags & MAP_ANONYMOUS) || fd < 0)
        return real.mmap(addr, len, prot, flags, fd, off);
    enum route how = route(CALLER);
    if (how == FORWARD)
        return real.mmap(addr, len, prot, flags, fd, off);
    if (how == REFUSE) {
        errno = EPERM;
        return MAP_FAILED;
    }
    if (call(C_MMAP, fd, (long long)len, off, NULL, NULL) < 0)
        return MAP_FAILED;
    return real.mmap(addr, len, prot, (flags & ~MAP_TYPE) | MAP_SHARED | MAP_ANONYMOUS, -1, 0);
}
ALIAS(mmap64, mmap);
