/*
 * blkbench: block-device throughput inside a lab's Linux guest (issue 19's disk benchmark).
 *
 *   blkbench DEVICE SECONDS [PREFIX]
 *
 * Four phases on DEVICE, each for SECONDS of wall time (CLOCK_MONOTONIC), all with O_DIRECT so the
 * guest's page cache is out of the measurement and every request reaches the virtio-blk device:
 *
 *   seq-write-1m   1 MiB writes at increasing offsets (wrapping at the device's end), then fdatasync
 *   seq-read-1m    1 MiB reads, likewise
 *   rand-write-4k  4 KiB writes at 4 KiB-aligned offsets drawn by xorshift64 (fixed seed), then fdatasync
 *   rand-read-4k   4 KiB reads, likewise
 *
 * One request in flight (queue depth 1): the cost of one round trip through the VMM is what is
 * compared.  Each phase prints one line:
 *
 *   PREFIX blkbench PHASE bytes=N ops=N seconds=S
 *
 * The host side (pykvm/lab/blkbench.py) parses those lines.  Exit status 0; 1 with one line on
 * stderr naming the failed call and errno; 2 for a bad command line.  DEVICE must take O_DIRECT
 * (a block device, or a file on a file system that supports it) and hold at least 1 MiB.  Built
 * static (no libc needed in the guest's root).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MIB (1u << 20)
#define PAGE 4096u

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "blkbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void phase(int fd, const char *name, int write, uint32_t bs, int random, uint64_t size,
                  double seconds, char *buf, const char *prefix)
{
    uint64_t blocks = size / bs, ops = 0, pos = 0, x = 0x9E3779B97F4A7C15ull;
    double t0 = now(), t;
    if (blocks == 0) {
        fprintf(stderr, "blkbench: the device holds %llu bytes, less than one %u-byte block\n",
                (unsigned long long)size, bs);
        exit(1);
    }
    do {
        uint64_t blk;
        if (random) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            blk = x % blocks;
        } else {
            blk = pos++ % blocks;
        }
        ssize_t n = write ? pwrite(fd, buf, bs, (off_t)(blk * bs)) : pread(fd, buf, bs, (off_t)(blk * bs));
        if (n != (ssize_t)bs) {
            if (n >= 0)
                errno = EIO;
            die(write ? "pwrite" : "pread");
        }
        ops++;
        t = now();
    } while (t - t0 < seconds);
    if (write && fdatasync(fd) != 0)
        die("fdatasync");
    t = now();
    printf("%s blkbench %s bytes=%llu ops=%llu seconds=%.6f\n", prefix, name,
           (unsigned long long)(ops * bs), (unsigned long long)ops, t - t0);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: blkbench DEVICE SECONDS [PREFIX]\n");
        return 2;
    }
    char *end;
    double seconds = strtod(argv[2], &end);
    const char *prefix = argc > 3 ? argv[3] : "";
    if (end == argv[2] || *end || !(seconds > 0 && seconds <= 600)) {
        fprintf(stderr, "blkbench: SECONDS must be in (0, 600]\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
        fprintf(stderr, "blkbench: %s: cannot be opened with O_DIRECT\n", argv[1]);
        return 1;
    }
    if (fd < 0)
        die(argv[1]);
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        off_t end = lseek(fd, 0, SEEK_END);    /* a regular file (a check on the host) */
        if (errno != ENOTTY || end < 0)
            die("BLKGETSIZE64");
        size = (uint64_t)end;
    }
    char *buf;
    int err = posix_memalign((void **)&buf, PAGE, MIB);
    if (err != 0) {
        errno = err;                           /* it returns the error, errno is untouched */
        die("posix_memalign");
    }
    for (uint32_t i = 0; i < MIB; i++)
        buf[i] = (char)(i * 131u + 7u);
    phase(fd, "seq-write-1m", 1, MIB, 0, size, seconds, buf, prefix);
    phase(fd, "seq-read-1m", 0, MIB, 0, size, seconds, buf, prefix);
    phase(fd, "rand-write-4k", 1, PAGE, 1, size, seconds, buf, prefix);
    phase(fd, "rand-read-4k", 0, PAGE, 1, size, seconds, buf, prefix);
    close(fd);
    return 0;
}
