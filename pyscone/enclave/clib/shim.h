/*
 * What the libc layer's three files share: shim.c (the core: routing, the one call to the
 * runtime, the file entry points), shim_stdio.c (C stdio) and shim_net.c (sockets, poll,
 * getaddrinfo).  Each includes this first (it defines _GNU_SOURCE).
 *
 * Everything declared here is hidden: one shared library, whose dynamic symbol table holds
 * only the libc names it interposes and the pyscone_shim_* functions the runtime calls (the
 * build says -fvisibility=default, so each file's own helpers are static and these say so).
 */
#ifndef PYSCONE_SHIM_H
#define PYSCONE_SHIM_H

#define _GNU_SOURCE
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define HIDDEN __attribute__((visibility("hidden")))

/* Call numbers: the same table is in pyscone/enclave/stdlib/clib.py (Call). */
enum {
    C_OPEN = 1, C_CLOSE, C_READ, C_WRITE, C_PREAD, C_PWRITE, C_LSEEK, C_FSTAT, C_STAT,
    C_FSYNC, C_FTRUNCATE, C_FCNTL, C_UNLINK, C_ACCESS, C_MKDIR, C_RMDIR, C_GETCWD,
    C_READLINK, C_FCHMOD, C_FCHOWN, C_OPENAT, C_MMAP, C_RENAME, C_FLOCK, C_SOCKET,
    C_DUP = 46,
};
/* The socket section's (shim_net.c). */
enum {
    C_CONNECT = 26, C_SEND, C_RECV, C_SENDTO, C_RECVFROM, C_GETSOCKOPT, C_SETSOCKOPT,
    C_GETSOCKNAME, C_GETPEERNAME, C_SHUTDOWN, C_POLL, C_GETADDRINFO, C_BIND, C_LISTEN,
    C_ACCEPT, C_SOCKETPAIR, C_UNCOVERED,
};

/* (call, a, b, c, p, q) -> result >= 0, or -errno.  p: an input pointer (a path, data to
 * write), q: an output pointer (a buffer to read into, the 13 stat fields, a struct flock). */
typedef long long (*dispatch_fn)(int, long long, long long, long long, const void *, void *);

/* The state the routing reads (shim.c): the stdio callbacks check it at every call. */
extern HIDDEN dispatch_fn dispatch;
extern HIDDEN __thread int enclave_thread;
extern HIDDEN __thread int in_dispatch;
extern HIDDEN unsigned long foreign_calls;

/* The libc functions shim.c and shim_stdio.c stand in front of (shim.c's constructor resolves
 * them; shim_net.c has its own table). */
struct libc_fns {
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
};
extern HIDDEN struct libc_fns real;

/* The next definition of `name` (libc's): dlsym(RTLD_NEXT). */
HIDDEN void *next(const char *name);

/* The routing decision (shim.c). */
enum route { FORWARD, DISPATCH, REFUSE };
HIDDEN enum route route(const void *caller);
/* A call to the runtime: the result, or -1 with errno set. */
HIDDEN long long call(int op, long long a, long long b, long long c, const void *p, void *q);
/* -1, EPERM. */
HIDDEN int refuse(void);

/* glibc's: what a fortified entry point calls when the buffer is smaller than asked. */
extern void __chk_fail(void) __attribute__((noreturn));

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

#endif
