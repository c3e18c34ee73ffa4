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

#include "shim.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>

/* What C_UNCOVERED explains (once each, on the console), then refuses: the same numbers are in
 * stdlib/clibnet.py (_UNCOVERED). */
enum { U_EPOLL = 1, U_CONTROL = 2, U_SLEEP = 3, U_SIGMASK = 4 };

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
