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
 *    write around it in plaintext.
 *
 * The runtime's own descriptors (the doorbells, the epoll set) are used through
 * eventfd_read/eventfd_write/epoll_wait, which this library does not interpose, so no fd
 * number is forwarded on trust: an fd number from a C library is always the host's (or a
 * virtual fd of the FS shield), even when it equals a doorbell's number.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define PYSCONE_SHIM_ABI 1

/* Call numbers: the same table is in pyscone/enclave/stdlib/clib.py (Call). */
enum {
    C_OPEN = 1, C_CLOSE, C_READ, C_WRITE, C_PREAD, C_PWRITE, C_LSEEK, C_FSTAT, C_STAT,
    C_FSYNC, C_FTRUNCATE, C_FCNTL, C_UNLINK, C_ACCESS, C_MKDIR, C_RMDIR, C_GETCWD,
    C_READLINK, C_FCHMOD, C_FCHOWN, C_OPENAT, C_MMAP, C_RENAME, C_FLOCK, C_SOCKET,
    C_DUP = 46,
};
/* The socket section's (at the end of this file). */
enum {
    C_CONNECT = 26, C_SEND, C_RECV, C_SENDTO, C_RECVFROM, C_GETSOCKOPT, C_SETSOCKOPT,
    C_GETSOCKNAME, C_GETPEERNAME, C_SHUTDOWN, C_POLL, C_GETADDRINFO, C_BIND, C_LISTEN,
    C_ACCEPT, C_SOCKETPAIR, C_UNCOVERED,
};

/* (call, a, b, c, p, q) -> result >= 0, or -errno.  p: an input pointer (a path, data to
 * write), q: an output pointer (a buffer to read into, the 13 stat fields, a struct flock). */
typedef long long (*dispatch_fn)(int, long long, long long, long long, const void *, void *);

static dispatch_fn dispatch;
static __thread int enclave_thread; /* set on the thread that armed the shim, only */
static __thread int in_dispatch;
static unsigned long foreign_calls;
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

static struct {
    int (*open)(const char *, int, ...);
    int (*openat)(int, const char *, int, ...);
    int (*close)(int);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*pread)(int, void *, size_t, off_t);
    ssize_t (*pwrite)(int, const void *, size_t, off_t);
    off_t (*lseek)(int, off_t, int);
    int (*fstat)(int, struct stat *);
    int (*stat)(const char *, struct stat *);
    int (*lstat)(const char *, struct stat *);
    int (*fsync)(int);
    int (*fdatasync)(int);
    int (*ftruncate)(int, off_t);
    int (*fcntl)(int, int, ...);
    int (*unlink)(const char *);
    int (*access)(const char *, int);
    int (*mkdir)(const char *, mode_t);
    int (*rmdir)(const char *);
    char *(*getcwd)(char *, size_t);
    ssize_t (*readlink)(const char *, char *, size_t);
    int (*fchmod)(int, mode_t);
    int (*fchown)(int, uid_t, gid_t);
    void *(*mmap)(void *, size_t, int, int, int, off_t);
    int (*rename)(const char *, const char *);
    int (*flock)(int, int);
    int (*socket)(int, int, int);
    FILE *(*fopen)(const char *, const char *);
    FILE *(*fdopen)(int, const char *);
    int (*fileno)(FILE *);
} real;

static void *next(const char *name) { return dlsym(RTLD_NEXT, name); }

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

enum route { FORWARD, DISPATCH, REFUSE };

static enum route route(const void *caller)
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

static long long call(int op, long long a, long long b, long long c, const void *p, void *q)
{
    int saved = errno;
    int changing = changes(op, a);
    if (changing)
        changed();
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

static int refuse(void)
{
    errno = EPERM;
    return -1;
}

#define CALLER __builtin_return_address(0)
/* The 64-bit names are the same functions on x86-64 (off_t and struct stat are 64-bit);
 * aliased in assembler because their C prototypes name struct stat64 and off64_t. */
#define ALIAS(name, target) __asm__(".globl " #name "\n\t.set " #name ", " #target)
#define ROUTE(fwd) ROUTE_FROM(CALLER, fwd)
/* The caller decides the route: a fortified entry point passes its own caller on. */
#define ROUTE_FROM(caller, fwd)                                                                 \
    enum route how_ = route(caller);                                                            \
    if (how_ == FORWARD)                                                                        \
        return fwd;                                                                             \
    if (how_ == REFUSE)                                                                         \
        return refuse()

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
extern void __chk_fail(void) __attribute__((noreturn));

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


/* C stdio ------------------------------------------------------------------------------
 *
 * glibc's FILE calls its own internal read/write/lseek/close, which no interposed symbol
 * stands in front of.  So fopen/fdopen from a C library (numpy's tofile/fromfile, which
 * fdopen a dup of the Python file's fd) build the FILE with fopencookie: glibc keeps the
 * buffering, formatting and ungetc, and every byte that reaches the file goes through the
 * callbacks below, which make the same calls as the interposed read/write/lseek/close
 * (the Python layer, the FS shield, the Iago checks).  The fd in the cookie is an enclave
 * fd (a host fd number or an FS-shield virtual fd), never touched by libc itself.
 * The interpreter's own fopen still forwards (to the barrier), as for every other call. */

struct stream {
    int fd;
    FILE *fp;
    struct stream *next;
};

/* Our streams, for fileno(): a FILE from fopencookie has no fd of its own (glibc says -1). */
static struct stream *streams;
static pthread_mutex_t streams_lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether a callback may go to the runtime.  A stream is only ever built armed, so its fd is
 * an enclave fd, never libc's to use: with the layer disarmed (or re-entered from the runtime)
 * a call is refused, not forwarded (a host fd may carry a doorbell's number).  The thread is
 * checked at every call, not only at fopen: another OS thread may use the FILE. */
static int stream_ok(void)
{
    if (dispatch == NULL || in_dispatch)
        return 0;
    if (!enclave_thread) {
        __atomic_add_fetch(&foreign_calls, 1, __ATOMIC_RELAXED);
        return 0;
    }
    return 1;
}

static ssize_t stream_read(void *cookie, char *buf, size_t n)
{
    int fd = ((struct stream *)cookie)->fd;
    if (!stream_ok() || (fd >= 0 && fd <= 2)) /* the console fds are the console shield's */
        return refuse();
    return (ssize_t)call(C_READ, fd, (long long)n, 0, NULL, buf);
}

/* glibc's cookie layer takes any short write as an error (it sets the FILE's error flag), and
 * one host call carries at most a slot's worth (64 KiB): so write all of it, or fail.  It takes
 * 0 as "nothing written, error" (the count so far is returned, errno set, if a later part fails). */
static ssize_t stream_write(void *cookie, const char *buf, size_t n)
{
    int fd = ((struct stream *)cookie)->fd;
    size_t done = 0;
    while (done < n) {
        ssize_t r;
        if (!stream_ok() || (fd >= 0 && fd <= 2))
            r = refuse();
        else
            r = (ssize_t)call(C_WRITE, fd, (long long)(n - done), 0, buf + done, NULL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

static int stream_seek(void *cookie, off64_t *pos, int whence)
{
    int fd = ((struct stream *)cookie)->fd;
    if (!stream_ok())
        return refuse();
    long long r = call(C_LSEEK, fd, *pos, whence, NULL, NULL);
    if (r < 0)
        return -1;
    *pos = (off64_t)r;
    return 0;
}

static int stream_close(void *cookie)
{
    struct stream *s = cookie;
    pthread_mutex_lock(&streams_lock);
    for (struct stream **p = &streams; *p != NULL; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    pthread_mutex_unlock(&streams_lock);
    int fd = s->fd;
    free(s);
    if (!stream_ok())
        return refuse();
    return (int)call(C_CLOSE, fd, 0, 0, NULL, NULL);
}

static const cookie_io_functions_t stream_io = {stream_read, stream_write, stream_seek, stream_close};

/* A FILE over enclave fd `fd`; NULL (errno set) if glibc refuses the mode or memory is out. */
static FILE *stream_open(int fd, const char *mode)
{
    struct stream *s = malloc(sizeof *s);
    if (s == NULL)
        return NULL;
    s->fd = fd;
    s->fp = fopencookie(s, mode, stream_io);
    if (s->fp == NULL) {
        int e = errno;
        free(s);
        errno = e;
        return NULL;
    }
    pthread_mutex_lock(&streams_lock);
    s->next = streams;
    streams = s;
    pthread_mutex_unlock(&streams_lock);
    return s->fp;
}

/* fopen's mode as open(2) flags, as glibc reads it: r/w/a, then '+', 'x', 'e' (b, t, m, c
 * and ",ccs=" change nothing for the fd). */
static int mode_flags(const char *mode, int *flags)
{
    int f;
    switch (mode[0]) {
    case 'r': f = O_RDONLY; break;
    case 'w': f = O_WRONLY | O_CREAT | O_TRUNC; break;
    case 'a': f = O_WRONLY | O_CREAT | O_APPEND; break;
    default: errno = EINVAL; return -1;
    }
    for (const char *m = mode + 1; *m != '\0' && *m != ','; m++) {
        if (*m == '+')
            f = (f & ~O_ACCMODE) | O_RDWR;
        else if (*m == 'x')
            f |= O_EXCL;
        else if (*m == 'e')
            f |= O_CLOEXEC;
    }
    *flags = f;
    return 0;
}

static FILE *fopen_from(const void *caller, const char *path, const char *mode)
{
    enum route how = route(caller);
    if (how == FORWARD) /* (possibly before the constructor ran: another library's) */
        return (real.fopen ? real.fopen : (FILE * (*)(const char *, const char *)) next("fopen64"))(path, mode);
    if (how == REFUSE) {
        errno = EPERM;
        return NULL;
    }
    int flags;
    if (mode_flags(mode, &flags) < 0)
        return NULL;
    int fd = (int)call(C_OPEN, flags, 0666, 0, path, NULL);
    if (fd < 0)
        return NULL;
    FILE *fp = stream_open(fd, mode);
    if (fp == NULL) {
        int e = errno;
        call(C_CLOSE, fd, 0, 0, NULL, NULL);
        errno = e;
    }
    return fp;
}

FILE *fopen(const char *path, const char *mode) { return fopen_from(CALLER, path, mode); }
FILE *fopen64(const char *path, const char *mode) { return fopen_from(CALLER, path, mode); }

FILE *fdopen(int fd, const char *mode)
{
    enum route how = route(CALLER);
    if (how == FORWARD)
        return (real.fdopen ? real.fdopen : (FILE * (*)(int, const char *)) next("fdopen"))(fd, mode);
    if (how == REFUSE) {
        errno = EPERM;
        return NULL;
    }
    /* As glibc's fdopen: the fd must be open (F_GETFL; a refused query is not "closed"). */
    if (call(C_FCNTL, fd, F_GETFL, 0, NULL, NULL) < 0 && errno == EBADF)
        return NULL;
    return stream_open(fd, mode);
}

int fileno(FILE *fp)
{
    if (__atomic_load_n(&streams, __ATOMIC_RELAXED) != NULL) {
        pthread_mutex_lock(&streams_lock);
        for (struct stream *s = streams; s != NULL; s = s->next)
            if (s->fp == fp) {
                int fd = s->fd;
                pthread_mutex_unlock(&streams_lock);
                return fd;
            }
        pthread_mutex_unlock(&streams_lock);
    }
    return (real.fileno ? real.fileno : (int (*)(FILE *))next("fileno"))(fp);
}


/* Sockets and poll from C libraries ------------------------------------------------------
 *
 * What libpq (under psycopg), hiredis or libmemcached need for a TCP or a Unix-domain client
 * socket.  Each call goes to the Python layer's own socket code (stdlib/sockets.py: the same
 * EnclaveSocket methods, host calls and Iago checks as the app's socket module), through the
 * handlers in stdlib/clibnet.py; the fd a C library gets is an ordinary enclave socket fd.
 * What is done here in C is only marshalling: a sendmsg/recvmsg becomes one sendto/recvfrom
 * over a flat buffer, and getaddrinfo's answer is rebuilt as glibc's linked list.
 *
 * getaddrinfo must be ours: glibc's resolver opens /etc/hosts, /etc/nsswitch.conf and a netlink
 * socket through its INTERNAL calls, which no interposed symbol stands in front of (they met
 * the barrier).  Our lists are freed by our freeaddrinfo, glibc's (the interpreter's, made
 * before arming) by glibc's: the list heads we made are remembered. */

/* What C_UNCOVERED explains (once each, on the console), then refuses: the same numbers are in
 * stdlib/clibnet.py (_UNCOVERED). */
enum { U_EPOLL = 1, U_CONTROL = 2, U_SLEEP = 3, U_SIGMASK = 4 };

#include <netdb.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>

static struct {
    int (*connect)(int, const struct sockaddr *, socklen_t);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*shutdown)(int, int);
    int (*poll)(struct pollfd *, nfds_t, int);
    int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
    int (*pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);
    int (*getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    void (*freeaddrinfo)(struct addrinfo *);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    int (*listen)(int, int);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*socketpair)(int, int, int, int[2]);
    int (*epoll_create)(int);
    int (*epoll_create1)(int);
} net;

__attribute__((constructor)) static void resolve_net(void)
{
    net.connect = next("connect");
    net.send = next("send");
    net.recv = next("recv");
    net.sendto = next("sendto");
    net.recvfrom = next("recvfrom");
    net.sendmsg = next("sendmsg");
    net.recvmsg = next("recvmsg");
    net.getsockopt = next("getsockopt");
    net.setsockopt = next("setsockopt");
    net.getsockname = next("getsockname");
    net.getpeername = next("getpeername");
    net.shutdown = next("shutdown");
    net.poll = next("poll");
    net.ppoll = next("ppoll");
    net.select = next("select");
    net.pselect = next("pselect");
    net.getaddrinfo = next("getaddrinfo");
    net.freeaddrinfo = next("freeaddrinfo");
    net.bind = next("bind");
    net.listen = next("listen");
    net.accept = next("accept");
    net.accept4 = next("accept4");
    net.socketpair = next("socketpair");
    net.epoll_create = next("epoll_create");
    net.epoll_create1 = next("epoll_create1");
}

/* An address travelling with a call (in q): in, the buffer and its size; out, the full length. */
struct sockarg {
    void *addr;
    long long len;
};

/* An option's level and name in one argument (both are ints). */
static long long optkey(int level, int name) { return ((long long)level << 32) | (unsigned int)name; }

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    ROUTE(net.connect(fd, addr, len));
    return (int)call(C_CONNECT, fd, len, 0, addr, NULL);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    ROUTE(net.bind(fd, addr, len));
    return (int)call(C_BIND, fd, len, 0, addr, NULL);
}

int listen(int fd, int backlog)
{
    ROUTE(net.listen(fd, backlog));
    return (int)call(C_LISTEN, fd, backlog, 0, NULL, NULL);
}

static int accept_from(const void *caller, int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    ROUTE_FROM(caller, net.accept4(fd, addr, len, flags));
    struct sockarg sa = {addr, addr && len ? (long long)*len : 0};
    long long r = call(C_ACCEPT, fd, flags, 0, NULL, &sa);
    if (r >= 0 && addr && len)
        *len = (socklen_t)sa.len;
    return (int)r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) { return accept_from(CALLER, fd, addr, len, 0); }
int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) { return accept_from(CALLER, fd, addr, len, flags); }

int socketpair(int domain, int type, int protocol, int sv[2])
{
    ROUTE(net.socketpair(domain, type, protocol, sv));
    return (int)call(C_SOCKETPAIR, domain, type, protocol, NULL, sv);
}

ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    ROUTE(net.send(fd, buf, n, flags));
    return (ssize_t)call(C_SEND, fd, (long long)n, flags, buf, NULL);
}

static ssize_t recv_from(const void *caller, int fd, void *buf, size_t n, int flags)
{
    ROUTE_FROM(caller, net.recv(fd, buf, n, flags));
    return (ssize_t)call(C_RECV, fd, (long long)n, flags, NULL, buf);
}

ssize_t recv(int fd, void *buf, size_t n, int flags) { return recv_from(CALLER, fd, buf, n, flags); }

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len)
{
    ROUTE(net.sendto(fd, buf, n, flags, addr, len));
    if (addr == NULL)
        return (ssize_t)call(C_SEND, fd, (long long)n, flags, buf, NULL);
    struct sockarg sa = {(void *)addr, len};
    return (ssize_t)call(C_SENDTO, fd, (long long)n, flags, buf, &sa);
}

static ssize_t recvfrom_from(const void *caller, int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                             socklen_t *len)
{
    ROUTE_FROM(caller, net.recvfrom(fd, buf, n, flags, addr, len));
    if (addr == NULL || len == NULL)
        return (ssize_t)call(C_RECV, fd, (long long)n, flags, NULL, buf);
    /* p: the address (in and out), q: the data. */
    struct sockarg sa = {addr, *len};
    long long r = call(C_RECVFROM, fd, (long long)n, flags, &sa, buf);
    if (r >= 0)
        *len = (socklen_t)sa.len;
    return (ssize_t)r;
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr, socklen_t *len)
{
    return recvfrom_from(CALLER, fd, buf, n, flags, addr, len);
}

static size_t iov_total(const struct msghdr *msg)
{
    size_t n = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++)
        n += msg->msg_iov[i].iov_len;
    return n;
}

/* One flat sendto: ancillary data (SCM_RIGHTS would pass enclave fds to a host process, or
 * host fds in) is not covered, explained and refused. */
ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    ROUTE(net.sendmsg(fd, msg, flags));
    if (msg->msg_controllen)
        return (ssize_t)call(C_UNCOVERED, U_CONTROL, 0, 0, NULL, NULL);
    size_t n = iov_total(msg), at = 0;
    char *flat = malloc(n ? n : 1);
    if (flat == NULL)
        return -1;
    for (size_t i = 0; i < msg->msg_iovlen; i++) {
        memcpy(flat + at, msg->msg_iov[i].iov_base, msg->msg_iov[i].iov_len);
        at += msg->msg_iov[i].iov_len;
    }
    struct sockarg sa = {msg->msg_name, msg->msg_namelen};
    long long r = msg->msg_name ? call(C_SENDTO, fd, (long long)n, flags, flat, &sa)
                                : call(C_SEND, fd, (long long)n, flags, flat, NULL);
    int e = errno;
    free(flat);
    errno = e;
    return (ssize_t)r;
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    ROUTE(net.recvmsg(fd, msg, flags));
    size_t n = iov_total(msg);
    char *flat = malloc(n ? n : 1);
    if (flat == NULL)
        return -1;
    struct sockarg sa = {msg->msg_name, msg->msg_name ? (long long)msg->msg_namelen : 0};
    long long r = call(C_RECVFROM, fd, (long long)n, flags, &sa, flat);
    if (r >= 0) {
        size_t left = (size_t)r, at = 0;
        for (size_t i = 0; i < msg->msg_iovlen && left; i++) {
            size_t k = msg->msg_iov[i].iov_len < left ? msg->msg_iov[i].iov_len : left;
            memcpy(msg->msg_iov[i].iov_base, flat + at, k);
            at += k;
            left -= k;
        }
        if (msg->msg_name)
            msg->msg_namelen = (socklen_t)sa.len;
        msg->msg_controllen = 0; /* no ancillary data ever arrives in the enclave */
        msg->msg_flags = 0;
    }
    int e = errno;
    free(flat);
    errno = e;
    return (ssize_t)r;
}

/* q: the value buffer, c: its size; the result is the size written. */
int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    ROUTE(net.getsockopt(fd, level, name, val, len));
    if (len == NULL) {
        errno = EFAULT;
        return -1;
    }
    long long r = call(C_GETSOCKOPT, fd, optkey(level, name), *len, NULL, val);
    if (r < 0)
        return -1;
    *len = (socklen_t)r;
    return 0;
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    ROUTE(net.setsockopt(fd, level, name, val, len));
    return (int)call(C_SETSOCKOPT, fd, optkey(level, name), len, val, NULL);
}

/* q: the address buffer, c: its size; the result is the address's full length (it may have
 * been truncated to the buffer, as the kernel does). */
static int sockname(int op, int fd, struct sockaddr *addr, socklen_t *len)
{
    if (len == NULL) {
        errno = EFAULT;
        return -1;
    }
    long long r = call(op, fd, 0, *len, NULL, addr);
    if (r < 0)
        return -1;
    *len = (socklen_t)r;
    return 0;
}

int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    ROUTE(net.getsockname(fd, addr, len));
    return sockname(C_GETSOCKNAME, fd, addr, len);
}

int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    ROUTE(net.getpeername(fd, addr, len));
    return sockname(C_GETPEERNAME, fd, addr, len);
}

int shutdown(int fd, int how)
{
    ROUTE(net.shutdown(fd, how));
    return (int)call(C_SHUTDOWN, fd, how, 0, NULL, NULL);
}

/* A wait on no descriptors is a sleep (poll(NULL, 0, ms), select(0, ..., &tv)): done here, in
 * place (nanosleep is the barrier's to allow), as every wait from C is; for ever is refused. */
static int no_fds(const struct pollfd *fds, nfds_t nfds)
{
    for (nfds_t i = 0; i < nfds; i++)
        if (fds[i].fd >= 0)
            return 0;
    return 1;
}

static int sleep_ms(long long ms)
{
    if (ms < 0)
        return (int)call(C_UNCOVERED, U_SLEEP, 0, 0, NULL, NULL);
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    return nanosleep(&ts, NULL) < 0 ? -1 : 0; /* EINTR: a signal, as natively */
}

/* q: the pollfd array (revents written back), a: its length, b: the timeout in ms (< 0: none). */
static int poll_ms(struct pollfd *fds, nfds_t nfds, long long ms)
{
    if (no_fds(fds, nfds)) {
        for (nfds_t i = 0; i < nfds; i++)
            fds[i].revents = 0;
        return sleep_ms(ms);
    }
    return (int)call(C_POLL, (long long)nfds, ms, 0, NULL, fds);
}

static int poll_from(const void *caller, struct pollfd *fds, nfds_t nfds, int timeout)
{
    ROUTE_FROM(caller, net.poll(fds, nfds, timeout));
    return poll_ms(fds, nfds, timeout);
}

int poll(struct pollfd *fds, nfds_t nfds, int timeout) { return poll_from(CALLER, fds, nfds, timeout); }

int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *ts, const sigset_t *mask)
{
    ROUTE(net.ppoll(fds, nfds, ts, mask));
    if (mask != NULL) /* an atomic signal-mask swap: nothing in the enclave does it */
        return (int)call(C_UNCOVERED, U_SIGMASK, 0, 0, NULL, NULL);
    long long ms = -1;
    if (ts != NULL) {
        ms = (long long)ts->tv_sec * 1000 + (ts->tv_nsec + 999999) / 1000000;
        if (ms > 0x7fffffff)
            ms = 0x7fffffff;
    }
    return poll_ms(fds, nfds, ms);
}

/* select as a poll (what Linux itself does): readable is POLLIN, POLLHUP or POLLERR, writable
 * POLLOUT or POLLERR, exceptional POLLPRI; a closed fd is EBADF.  The timeval is not updated. */
static int select_ms(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, long long ms)
{
    if (nfds < 0 || nfds > FD_SETSIZE) {
        errno = EINVAL;
        return -1;
    }
    struct pollfd *p = malloc(sizeof *p * (size_t)(nfds ? nfds : 1));
    if (p == NULL)
        return -1;
    int n = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short ev = (short)((rd && FD_ISSET(fd, rd) ? POLLIN : 0) | (wr && FD_ISSET(fd, wr) ? POLLOUT : 0) |
                           (ex && FD_ISSET(fd, ex) ? POLLPRI : 0));
        if (ev)
            p[n++] = (struct pollfd){fd, ev, 0};
    }
    int r = poll_ms(p, (nfds_t)n, ms);
    if (r >= 0) {
        r = 0;
        for (int i = 0; i < n; i++) {
            if (p[i].revents & POLLNVAL) {
                free(p);
                errno = EBADF;
                return -1;
            }
        }
        if (rd)
            FD_ZERO(rd);
        if (wr)
            FD_ZERO(wr);
        if (ex)
            FD_ZERO(ex);
        for (int i = 0; i < n; i++) {
            short ev = p[i].events, got = p[i].revents;
            if ((ev & POLLIN) && (got & (POLLIN | POLLHUP | POLLERR))) {
                FD_SET(p[i].fd, rd);
                r++;
            }
            if ((ev & POLLOUT) && (got & (POLLOUT | POLLERR))) {
                FD_SET(p[i].fd, wr);
                r++;
            }
            if ((ev & POLLPRI) && (got & POLLPRI)) {
                FD_SET(p[i].fd, ex);
                r++;
            }
        }
    }
    int e = errno;
    free(p);
    errno = e;
    return r;
}

int select(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, struct timeval *tv)
{
    ROUTE(net.select(nfds, rd, wr, ex, tv));
    long long ms = tv ? (long long)tv->tv_sec * 1000 + (tv->tv_usec + 999) / 1000 : -1;
    return select_ms(nfds, rd, wr, ex, ms);
}

int pselect(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, const struct timespec *ts, const sigset_t *mask)
{
    ROUTE(net.pselect(nfds, rd, wr, ex, ts, mask));
    if (mask != NULL)
        return (int)call(C_UNCOVERED, U_SIGMASK, 0, 0, NULL, NULL);
    long long ms = ts ? (long long)ts->tv_sec * 1000 + (ts->tv_nsec + 999999) / 1000000 : -1;
    return select_ms(nfds, rd, wr, ex, ms);
}

/* What _FORTIFY_SOURCE makes of recv/recvfrom/poll when the buffer's size is known. */
ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    if (n > buflen)
        __chk_fail();
    return recv_from(CALLER, fd, buf, n, flags);
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags, struct sockaddr *addr,
                       socklen_t *len)
{
    if (n > buflen)
        __chk_fail();
    return recvfrom_from(CALLER, fd, buf, n, flags, addr, len);
}

int __poll_chk(struct pollfd *fds, nfds_t nfds, int timeout, size_t fdslen)
{
    if (fdslen / sizeof *fds < nfds)
        __chk_fail();
    return poll_from(CALLER, fds, nfds, timeout);
}

/* epoll from C (libuv's): the runtime's own epoll set was made before arming and its waits
 * are not interposed, so a C library's new epoll instance is the only thing to stop. */
int epoll_create(int size)
{
    ROUTE(net.epoll_create(size));
    return (int)call(C_UNCOVERED, U_EPOLL, 0, 0, NULL, NULL);
}

int epoll_create1(int flags)
{
    ROUTE(net.epoll_create1(flags));
    return (int)call(C_UNCOVERED, U_EPOLL, 0, 0, NULL, NULL);
}

/* getaddrinfo's question (in p) and the runtime's answer (in q, at most `cap` bytes): a header
 * (int status: 0 or an EAI_ code; int count), then per entry five ints (family, socktype,
 * protocol, address length, canonical name length), the address and the name (no NUL). */
struct gaiarg {
    const char *node;
    const char *service;
    long long cap;
};

#define GAI_CAP 16384

/* One allocation holds a whole answer: the list, the addresses and the names. */
struct gaiblock {
    struct gaiblock *next;
    struct addrinfo ai[];
};

static struct gaiblock *gaiblocks;
static pthread_mutex_t gai_lock = PTHREAD_MUTEX_INITIALIZER;

static int gai_build(const char *buf, long long used, struct addrinfo **res)
{
    int status, count;
    memcpy(&status, buf, 4);
    memcpy(&count, buf + 4, 4);
    if (status != 0)
        return status;
    if (count <= 0)
        return EAI_NONAME;
    /* Each entry's address and name fit in what the runtime wrote: the block is that large. */
    size_t size = sizeof(struct gaiblock) + (size_t)count * sizeof(struct addrinfo) + (size_t)used + (size_t)count;
    struct gaiblock *b = calloc(1, size);
    if (b == NULL)
        return EAI_MEMORY;
    char *heap = (char *)&b->ai[count];
    long long at = 8;
    for (int i = 0; i < count; i++) {
        int f[5];
        if (at + 20 > used) {
            free(b);
            return EAI_FAIL;
        }
        memcpy(f, buf + at, 20);
        at += 20;
        if (f[3] < 0 || f[4] < 0 || at + f[3] + f[4] > used) {
            free(b);
            return EAI_FAIL;
        }
        struct addrinfo *ai = &b->ai[i];
        ai->ai_family = f[0];
        ai->ai_socktype = f[1];
        ai->ai_protocol = f[2];
        ai->ai_addrlen = (socklen_t)f[3];
        ai->ai_addr = (struct sockaddr *)heap;
        memcpy(heap, buf + at, (size_t)f[3]);
        heap += f[3];
        at += f[3];
        if (f[4]) {
            ai->ai_canonname = heap;
            memcpy(heap, buf + at, (size_t)f[4]);
            heap[f[4]] = '\0';
            heap += f[4] + 1;
            at += f[4];
        }
        ai->ai_next = i + 1 < count ? &b->ai[i + 1] : NULL;
    }
    pthread_mutex_lock(&gai_lock);
    b->next = gaiblocks;
    gaiblocks = b;
    pthread_mutex_unlock(&gai_lock);
    *res = b->ai;
    return 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    enum route how = route(CALLER);
    if (how == FORWARD)
        return net.getaddrinfo(node, service, hints, res);
    if (how == REFUSE) {
        errno = EPERM;
        return EAI_SYSTEM;
    }
    struct gaiarg q = {node, service, GAI_CAP};
    char *buf = malloc(GAI_CAP);
    if (buf == NULL)
        return EAI_MEMORY;
    long long family = hints ? hints->ai_family : 0, socktype = hints ? hints->ai_socktype : 0;
    long long proto = hints ? hints->ai_protocol : 0, flags = hints ? (unsigned int)hints->ai_flags : 0;
    long long used = call(C_GETADDRINFO, family, socktype | (proto << 32), flags, &q, buf);
    int r = used < 0 ? (errno == ENOMEM ? EAI_MEMORY : EAI_SYSTEM) : gai_build(buf, used, res);
    int e = errno;
    free(buf);
    errno = e;
    return r;
}

void freeaddrinfo(struct addrinfo *ai)
{
    if (ai == NULL)
        return;
    pthread_mutex_lock(&gai_lock);
    for (struct gaiblock **p = &gaiblocks; *p != NULL; p = &(*p)->next)
        if ((*p)->ai == ai) {
            struct gaiblock *b = *p;
            *p = b->next;
            pthread_mutex_unlock(&gai_lock);
            free(b);
            return;
        }
    pthread_mutex_unlock(&gai_lock);
    (net.freeaddrinfo ? net.freeaddrinfo : (void (*)(struct addrinfo *))next("freeaddrinfo"))(ai);
}
