// What the kernel's TCP costs, on this machine, for the bytes of one ring all-reduce step between
// two processes (each sends 32 MiB to the other while receiving 32 MiB), by three ways of
// sending: plain send(), MSG_ZEROCOPY (what IORING_OP_SEND_ZC does from io_uring), and
// vmsplice + splice of the sender's pages. The receiver always copies with recv() into its own
// buffer. Each process has a sender thread and a receiving thread, both spinning on
// non-blocking calls, as our links do. The modes alternate, round after round, so that the
// machine's state changes affect all of them alike.
//
//   cc -O2 -pthread -o /tmp/tcp_send_modes benches/probes/tcp_send_modes.c
//   /tmp/tcp_send_modes [rounds=5] [reps=12]
//
// Prints per mode the median and minimum time of one exchange, and for MSG_ZEROCOPY how many
// completion notices the kernel flagged SO_EE_CODE_ZEROCOPY_COPIED (it copied after all: data
// delivered to a socket of the same kernel is copied). Every received byte is checked. Used for
// docs/architecture.md (the tcp link kind: what was measured and not built).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

enum { PLAIN, ZEROCOPY, SPLICE, MODES };
static const char *NAMES[MODES] = {"send", "MSG_ZEROCOPY", "vmsplice+splice"};
static const size_t SEG = 32u << 20;  // one segment of a 64 MiB all-reduce between 2 ranks
static const size_t PIECE = 1u << 20; // bytes per send call

struct job {
  int fd, mode, pipe[2];
  const char *buf;
  long copied, notes, done, sent;
};

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

// Collects MSG_ZEROCOPY completions: each covers the sends numbered ee_info..ee_data.
static void reap(struct job *j) {
  for (;;) {
    char cb[256];
    struct msghdr mh = {.msg_control = cb, .msg_controllen = sizeof cb};
    if (recvmsg(j->fd, &mh, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
      if (errno == EAGAIN || errno == EINTR) return;
      die("recvmsg(MSG_ERRQUEUE)");
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      struct sock_extended_err *e = (void *)CMSG_DATA(c);
      if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
      j->done += (long)(e->ee_data - e->ee_info) + 1;
      j->notes++;
      if (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) j->copied++;
    }
  }
}

static void *sender(void *arg) {
  struct job *j = arg;
  size_t off = 0;
  while (off < SEG) {
    size_t m = SEG - off < PIECE ? SEG - off : PIECE;
    ssize_t k;
    if (j->mode == SPLICE) {
      struct iovec v = {(void *)(j->buf + off), m};
      k = vmsplice(j->pipe[1], &v, 1, SPLICE_F_NONBLOCK);
      if (k < 0 && errno != EAGAIN) die("vmsplice");
      for (ssize_t left = k; left > 0;) {
        ssize_t s = splice(j->pipe[0], NULL, j->fd, NULL, left, SPLICE_F_MORE | SPLICE_F_NONBLOCK);
        if (s < 0 && errno != EAGAIN) die("splice");
        if (s > 0) left -= s; else sched_yield();
      }
    } else {
      k = send(j->fd, j->buf + off, m, MSG_DONTWAIT | (j->mode == ZEROCOPY ? MSG_ZEROCOPY : 0));
      if (k < 0 && errno != EAGAIN && errno != ENOBUFS) die("send");
      if (k > 0 && j->mode == ZEROCOPY) j->sent++;
    }
    if (k > 0) off += (size_t)k; else sched_yield();
    if (j->mode == ZEROCOPY) reap(j);
  }
  // The sender's buffer may be reused only once the kernel let go of its pages.
  while (j->mode == ZEROCOPY && j->done < j->sent) {
    reap(j);
    sched_yield();
  }
  return NULL;
}

// One exchange: SEG bytes each way. Returns its wall time in ms.
static double exchange(int fd, int mode, const char *out, char *in, struct job *j, char expect) {
  j->fd = fd, j->mode = mode, j->buf = out;
  double t0 = now();
  pthread_t th;
  if (pthread_create(&th, NULL, sender, j)) die("pthread_create");
  size_t got = 0;
  while (got < SEG) {
    ssize_t k = recv(fd, in + got, SEG - got, MSG_DONTWAIT);
    if (k == 0) { fprintf(stderr, "peer closed\n"); exit(1); }
    if (k < 0 && errno != EAGAIN) die("recv");
    if (k > 0) got += (size_t)k; else sched_yield();
  }
  pthread_join(th, NULL);
  char c = 0; // both ends finished: the next exchange starts together
  if (send(fd, &c, 1, 0) != 1 || recv(fd, &c, 1, MSG_WAITALL) != 1) die("sync");
  double ms = (now() - t0) * 1e3;
  for (size_t i = 0; i < SEG; i += 4096)
    if (in[i] != expect) { fprintf(stderr, "wrong byte at %zu\n", i); exit(1); }
  return ms;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 5, reps = argc > 2 ? atoi(argv[2]) : 12;
  if (rounds < 1 || reps < 1 || reps > 1000) { fprintf(stderr, "usage: %s [rounds] [reps]\n", argv[0]); return 2; }
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof a;
  if (ls < 0 || bind(ls, (void *)&a, sizeof a) || getsockname(ls, (void *)&a, &al) || listen(ls, 1))
    die("listen");
  pid_t child = fork();
  if (child < 0) die("fork");
  int fd = child == 0 ? socket(AF_INET, SOCK_STREAM, 0) : accept(ls, NULL, NULL);
  if (fd < 0 || (child == 0 && connect(fd, (void *)&a, sizeof a))) die("connect");
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one)) die("SO_ZEROCOPY");
  char me = child == 0 ? 1 : 2, peer = child == 0 ? 2 : 1;
  char *out = aligned_alloc(4096, SEG), *in = aligned_alloc(4096, SEG);
  if (!out || !in) die("alloc");
  memset(out, me, SEG);
  memset(in, 0, SEG);
  struct job j = {0};
  if (pipe(j.pipe)) die("pipe");
  fcntl(j.pipe[1], F_SETPIPE_SZ, (int)PIECE);
  double *t[MODES];
  for (int m = 0; m < MODES; m++) t[m] = calloc((size_t)rounds * reps, sizeof(double));
  for (int r = 0; r < rounds; r++)
    for (int m = 0; m < MODES; m++) {
      exchange(fd, m, out, in, &j, peer); // warm-up
      for (int i = 0; i < reps; i++) t[m][r * reps + i] = exchange(fd, m, out, in, &j, peer);
    }
  if (child == 0) return 0;
  int n = rounds * reps;
  printf("one exchange of %zu MiB each way between 2 processes over loopback TCP, %d per mode:\n", SEG >> 20, n);
  for (int m = 0; m < MODES; m++) {
    qsort(t[m], (size_t)n, sizeof(double), cmp);
    printf("  %-16s median %6.2f ms  min %6.2f ms", NAMES[m], t[m][n / 2], t[m][0]);
    if (m == ZEROCOPY) printf("  (%ld of %ld completion notices flagged ZEROCOPY_COPIED)", j.copied, j.notes);
    printf("\n");
  }
  int st;
  waitpid(child, &st, 0);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
