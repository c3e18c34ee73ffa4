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

#include "shim.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>

struct stream {
    int fd;
    int console; /* glibc's stdout/stderr, replaced while the console shield is on */
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
    int console = ((struct stream *)cookie)->console;
    size_t done = 0;
    while (done < n) {
        ssize_t r;
        if (!stream_ok() || (fd >= 0 && fd <= 2 && !console))
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
    if (s->console) /* fclose(stdout) by a C library: the console stays the runtime's */
        return 0;
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
    s->console = 0;
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

/* The console shield is on: glibc's own stdout and stderr write past every interposed symbol
 * (to the barrier, EPERM: a C printf was lost), so they are replaced by streams whose bytes go
 * to the runtime's fds 1 and 2, that is, into the shield's records.  stdout is line-buffered
 * and stderr unbuffered: the enclave leaves with _exit, so glibc never flushes at exit.
 * Whatever glibc's own streams still buffer is dropped, never written.  Idempotent; 0, or -1. */
int pyscone_shim_console(void)
{
    static int done;
    if (done)
        return 0;
    FILE *out = stream_open(1, "w"), *err = stream_open(2, "w");
    if (out == NULL || err == NULL)
        return -1;
    done = 1;
    for (struct stream *s = streams; s != NULL; s = s->next)
        if (s->fp == out || s->fp == err)
            s->console = 1;
    setvbuf(out, NULL, _IOLBF, BUFSIZ);
    setvbuf(err, NULL, _IONBF, 0);
    stdout = out;
    stderr = err;
    return 0;
}
