/* vsockecho: a small static program for pykvm's Linux guests (busybox has no socat), built by
 * pykvm/lab/rootfs.py into the root image as /usr/bin/vsockecho.
 *
 *   vsockecho listen PORT [COUNT]
 *       listen on vsock port PORT (any CID), print "vsockecho: listening on port PORT", then
 *       accept COUNT connections (default 1; 0 = forever) one after another and echo each back
 *       until its peer closes; after each: "vsockecho: echoed N bytes to cid C port P".
 *   vsockecho connect CID PORT MESSAGE
 *       connect to CID:PORT (the host is CID 2), write MESSAGE and a newline, half-close, read
 *       until the peer closes and print "vsockecho: reply: <what came back>" (newlines as
 *       spaces, at most 4000 bytes shown).
 *
 * Every failure prints one line "vsockecho: <what>: <strerror>" and exits 1; bad usage exits 2.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
    printf("vsockecho: %s: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static unsigned long number(const char *s, unsigned long max)
{
    char *end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (!*s || *end || errno || v > max) {
        printf("vsockecho: not a number up to %lu: %s\n", max, s);
        exit(2);
    }
    return v;
}

static int do_listen(unsigned port, unsigned long count)
{
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    int s = socket(AF_VSOCK, SOCK_STREAM, 0), one = 1;
    unsigned long done = 0;
    if (s < 0)
        return fail("socket(AF_VSOCK)");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        return fail("bind");
    if (listen(s, 4) < 0)
        return fail("listen");
    printf("vsockecho: listening on port %u\n", port);
    while (count == 0 || done < count) {
        struct sockaddr_vm peer;
        socklen_t len = sizeof peer;
        char buf[65536];
        unsigned long long total = 0;
        int c = accept(s, (struct sockaddr *)&peer, &len);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            return fail("accept");
        }
        for (;;) {
            ssize_t r = read(c, buf, sizeof buf);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                fail("read");
                break;
            }
            if (r == 0)
                break;
            if (write_all(c, buf, (size_t)r) < 0) {
                fail("write");
                break;
            }
            total += (unsigned long long)r;
        }
        close(c);
        printf("vsockecho: echoed %llu bytes to cid %u port %u\n", total, peer.svm_cid,
               peer.svm_port);
        done++;
    }
    close(s);
    return 0;
}

static int do_connect(unsigned cid, unsigned port, const char *msg)
{
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    char buf[4001];
    size_t got = 0, i;
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket(AF_VSOCK)");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        return fail("connect");
    if (write_all(s, msg, strlen(msg)) < 0 || write_all(s, "\n", 1) < 0)
        return fail("write");
    if (shutdown(s, SHUT_WR) < 0)
        return fail("shutdown");
    for (;;) {
        char scratch[4096];
        ssize_t r = read(s, got < sizeof buf - 1 ? buf + got : scratch,
                         got < sizeof buf - 1 ? sizeof buf - 1 - got : sizeof scratch);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return fail("read");
        if (r == 0)
            break;
        if (got < sizeof buf - 1)
            got += (size_t)r;
    }
    close(s);
    buf[got] = 0;
    for (i = 0; i < got; i++)
        if (buf[i] == '\n' || buf[i] == '\r' || buf[i] == 0)
            buf[i] = ' ';
    printf("vsockecho: reply: %s\n", buf);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 3 && argc <= 4 && !strcmp(argv[1], "listen"))
        return do_listen((unsigned)number(argv[2], 0xffffffffu),
                         argc == 4 ? number(argv[3], 0xffffffffu) : 1);
    if (argc == 5 && !strcmp(argv[1], "connect"))
        return do_connect((unsigned)number(argv[2], 0xffffffffu),
                          (unsigned)number(argv[3], 0xffffffffu), argv[4]);
    printf("usage: vsockecho listen PORT [COUNT] | vsockecho connect CID PORT MESSAGE\n");
    return 2;
}
