/*
 * netbench: network and shared-directory throughput inside a lab's Linux guest (issue 20's
 * benchmark; the host side is pykvm/lab/netbench.py).
 *
 *   netbench tcp HOST PORT SECONDS PREFIX LABEL
 *   netbench read FILE SECONDS PREFIX LABEL
 *   netbench files DIR PREFIX LABEL
 *
 * tcp: three phases against the host's server at HOST:PORT (IPv4), a connection each, the guest
 * always the client (so user-mode networking needs no port forwarded into the guest). The first
 * byte the guest sends names the phase:
 *
 *   LABEL-tx   'T', then 64 KiB writes for SECONDS, shutdown(SHUT_WR); the host counts what it
 *              received and answers with that count (8 bytes, big-endian) once it sees the end:
 *              bytes = the host's count, seconds = up to that answer (the queues drained)
 *   LABEL-rx   'R'; the host writes until the guest closes; the guest reads for SECONDS
 *   LABEL-rr   'P', then 1-byte write / 1-byte read round trips for SECONDS (TCP_NODELAY; the
 *              host echoes each byte): ops = round trips
 *
 * read: FILE read sequentially in 1 MiB reads until its end or SECONDS, whichever comes first
 * (phase LABEL-read-1m). files: every regular file in DIR opened, read whole in 4 KiB reads and
 * closed (phase LABEL-files-4k, ops = files). Drop the guest's caches first (the caller does).
 *
 * Each phase prints one line, as blkbench.c does:
 *
 *   PREFIX netbench PHASE bytes=N ops=N seconds=S
 *
 * Exit status 0; 1 with one line on stderr naming the failed call and errno; 2 for a bad command
 * line. Connecting is retried for 20 s (the link may come up late); a TCP phase whose connection
 * breaks (reset, closed, an rx phase with no byte, or no progress for STALL seconds either way)
 * is said on stderr and run once more. Built static.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64u << 10)
#define MIB (1u << 20)
#ifndef STALL
#define STALL 60 /* seconds a connection may make no progress (SO_RCVTIMEO, SO_SNDTIMEO) */
#endif

static char buf[MIB];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

#define STR_(x) #x
#define STR(x) STR_(x)

/* Why a call failed: errno's text, or the stall that SO_RCVTIMEO/SO_SNDTIMEO ended. */
static const char *why(int err)
{
    return err == EAGAIN ? "no progress for " STR(STALL) " s" : strerror(err);
}

static void die(const char *what)
{
    fprintf(stderr, "netbench: %s: %s\n", what, why(errno));
    exit(1);
}

static void report(const char *prefix, const char *label, const char *phase, uint64_t bytes,
                   uint64_t ops, double seconds)
{
    printf("%s netbench %s-%s bytes=%llu ops=%llu seconds=%.6f\n", prefix, label, phase,
           (unsigned long long)bytes, (unsigned long long)ops, seconds);
    fflush(stdout);
}

static int dial(const char *host, int port, char what)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "netbench: %s is not an IPv4 address\n", host);
        exit(2);
    }
    double t0 = now();
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        struct timeval stall = {.tv_sec = STALL};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &stall, sizeof stall);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &stall, sizeof stall);   /* connect too */
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (write(fd, &what, 1) != 1) {
                int err = errno;
                close(fd);
                errno = err;
                return -1;                 /* the phase's first byte: a broken connection */
            }
            return fd;
        }
        int err = errno;
        close(fd);
        if (now() - t0 > 20) {
            errno = err;
            die("connect");
        }
        usleep(200000);
    }
}

/* One TCP phase on the connection fd (its first byte sent): its bytes, ops and seconds, or,
 * when the connection broke, `failed` naming the call that failed (errno says why). */
struct result {
    uint64_t bytes, ops;
    double seconds;
    const char *failed;
};

static struct result to_host(int fd, double seconds)
{
    struct result r = {0};
    double t0 = now();
    do {
        if (write(fd, buf, CHUNK) < 0) {
            r.failed = "write";
            return r;
        }
        r.ops++;
    } while (now() - t0 < seconds);
    if (shutdown(fd, SHUT_WR) != 0) {
        r.failed = "shutdown";
        return r;
    }
    unsigned char cnt[8];
    size_t got = 0;
    while (got < sizeof cnt) {
        ssize_t n = read(fd, cnt + got, sizeof cnt - got);
        if (n <= 0) {
            if (n == 0)
                errno = EPIPE;
            r.failed = "read (the host's count)";
            return r;
        }
        got += (size_t)n;
    }
    r.seconds = now() - t0;
    for (int i = 0; i < 8; i++)
        r.bytes = r.bytes << 8 | cnt[i];
    return r;
}

static struct result from_host(int fd, double seconds)
{
    struct result r = {0};
    double t0 = now();
    do {
        ssize_t n = read(fd, buf, MIB);
        if (n < 0) {
            r.failed = "read";
            return r;
        }
        if (n == 0) {
            if (r.ops == 0) {              /* the host closed before it sent a byte */
                errno = EPIPE;
                r.failed = "read (the host sent nothing)";
                return r;
            }
            break;
        }
        r.bytes += (uint64_t)n;
        r.ops++;
    } while (now() - t0 < seconds);
    r.seconds = now() - t0;
    return r;
}

static struct result round_trips(int fd, double seconds)
{
    struct result r = {0};
    double t0 = now();
    do {
        char c = (char)r.ops;
        if (write(fd, &c, 1) != 1) {
            r.failed = "write";
            return r;
        }
        ssize_t n = read(fd, &c, 1);
        if (n != 1) {
            if (n == 0)
                errno = EPIPE;
            r.failed = "read";
            return r;
        }
        r.ops++;
    } while (now() - t0 < seconds);
    r.seconds = now() - t0;
    r.bytes = r.ops;
    return r;
}

/* A phase on a connection of its own; a phase whose connection broke is said on stderr and run
 * once more on a new connection (a host starved of CPU can make a user-mode network's stack
 * reset a connection), a second break ends netbench with status 1. */
static void phase(const char *host, int port, char what, struct result (*run)(int, double),
                  double seconds, const char *prefix, const char *label, const char *name)
{
    for (int attempt = 1;; attempt++) {
        int fd = dial(host, port, what);
        struct result r = {.failed = "write (the phase's first byte)"};
        int err = errno;
        if (fd >= 0) {
            r = run(fd, seconds);
            err = errno;
            close(fd);
        }
        if (r.failed == NULL) {
            report(prefix, label, name, r.bytes, r.ops, r.seconds);
            return;
        }
        errno = err;
        if (attempt == 2)
            die(r.failed);
        fprintf(stderr, "netbench: %s-%s: %s: %s (after %llu ops); once more\n", label, name,
                r.failed, why(err), (unsigned long long)r.ops);
        fflush(stderr);
    }
}

static void tcp(const char *host, int port, double seconds, const char *prefix, const char *label)
{
    phase(host, port, 'T', to_host, seconds, prefix, label, "tx");
    phase(host, port, 'R', from_host, seconds, prefix, label, "rx");
    phase(host, port, 'P', round_trips, seconds, prefix, label, "rr");
}

static void readfile(const char *path, double seconds, const char *prefix, const char *label)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    uint64_t total = 0, ops = 0;
    double t0 = now();
    for (;;) {
        ssize_t n = read(fd, buf, MIB);
        if (n < 0)
            die("read");
        if (n == 0)
            break;
        total += (uint64_t)n;
        ops++;
        if (now() - t0 >= seconds)
            break;
    }
    double t = now() - t0;
    close(fd);
    report(prefix, label, "read-1m", total, ops, t);
}

static void files(const char *dir, const char *prefix, const char *label)
{
    double t0 = now();
    DIR *d = opendir(dir);
    if (d == NULL)
        die(dir);
    int dfd = dirfd(d);
    uint64_t total = 0, ops = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        int fd = openat(dfd, e->d_name, O_RDONLY);
        if (fd < 0)
            die(e->d_name);
        ssize_t n;
        while ((n = read(fd, buf, 4096)) > 0)
            total += (uint64_t)n;
        if (n < 0)
            die("read");
        close(fd);
        ops++;
    }
    closedir(d);
    report(prefix, label, "files-4k", total, ops, now() - t0);
}

static double secs(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v > 0 && v <= 600)) {
        fprintf(stderr, "netbench: SECONDS must be in (0, 600]\n");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);              /* a peer that went: EPIPE from write, said and retried */
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (char)(i * 131u + 7u);
    if (argc == 7 && strcmp(argv[1], "tcp") == 0) {
        int port = atoi(argv[3]);
        if (port <= 0 || port > 65535) {
            fprintf(stderr, "netbench: PORT must be 1-65535\n");
            return 2;
        }
        tcp(argv[2], port, secs(argv[4]), argv[5], argv[6]);
        return 0;
    }
    if (argc == 6 && strcmp(argv[1], "read") == 0) {
        readfile(argv[2], secs(argv[3]), argv[4], argv[5]);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "files") == 0) {
        files(argv[2], argv[3], argv[4]);
        return 0;
    }
    fprintf(stderr, "usage: netbench tcp HOST PORT SECONDS PREFIX LABEL | read FILE SECONDS PREFIX "
                    "LABEL | files DIR PREFIX LABEL\n");
    return 2;
}
