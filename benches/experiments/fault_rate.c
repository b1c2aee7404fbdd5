// How fast this machine faults in fresh anonymous memory: the cost a host load into new
// memory pays before its bytes can land (its connections fault the pages in as they write
// them).
// Usage: fault_rate GIB THREADS [4k|thp|copy]   (prints one line: GB/s)
// `copy`: instead, memcpy between two buffers already faulted in, GIB each, split across
// THREADS (the machine's memory bandwidth for the copies a load makes: bytes copied per second).
// Build: cc -O2 -pthread -static -o fault_rate fault_rate.c
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static char *base;
static size_t len, chunk = 1 << 20;
static int threads;
static char *from;

static void *copy_lane(void *arg) {
  long k = (long)arg;
  size_t share = len / threads, at = (size_t)k * share;
  memcpy(base + at, from + at, k == threads - 1 ? len - at : share);
  return NULL;
}

static void *lane(void *arg) {
  long k = (long)arg;
  for (size_t at = (size_t)k * chunk; at < len; at += (size_t)threads * chunk) {
    size_t n = len - at < chunk ? len - at : chunk;
    if (madvise(base + at, n, MADV_POPULATE_WRITE) != 0) {
      perror("madvise(MADV_POPULATE_WRITE)");
      exit(1);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s GIB THREADS [4k|thp|copy]\n", argv[0]);
    return 2;
  }
  len = (size_t)(atof(argv[1]) * (1 << 30));
  threads = atoi(argv[2]);
  int thp = argc > 3 && strcmp(argv[3], "thp") == 0;
  int copy = argc > 3 && strcmp(argv[3], "copy") == 0;
  if (argc > 3 && !thp && !copy && strcmp(argv[3], "4k") != 0) {
    fprintf(stderr, "mode: 4k, thp or copy\n");
    return 2;
  }
  if (threads < 1 || threads > 256) {
    fprintf(stderr, "THREADS: 1 to 256\n");
    return 2;
  }
  base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  madvise(base, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  if (copy) {
    from = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (from == MAP_FAILED) {
      perror("mmap");
      return 1;
    }
    madvise(base, len, MADV_HUGEPAGE);  // both buffers alike
    madvise(from, len, MADV_HUGEPAGE);
    memset(base, 1, len);
    memset(from, 2, len);
    double best = 0;
    for (int pass = 0; pass < 3; pass++) {
      struct timespec a, b;
      pthread_t t[256];
      clock_gettime(CLOCK_MONOTONIC, &a);
      for (long k = 0; k < threads; k++)
        if (pthread_create(&t[k], NULL, copy_lane, (void *)k) != 0) {
          perror("pthread_create");
          return 1;
        }
      for (long k = 0; k < threads; k++) pthread_join(t[k], NULL);
      clock_gettime(CLOCK_MONOTONIC, &b);
      double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
      if (len / s / 1e9 > best) best = len / s / 1e9;
    }
    printf("copy %d threads: %.2f GB/s (best of 3, %.2f GiB)\n", threads, best,
           len / (double)(1 << 30));
    return 0;
  }
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pthread_t t[256];
  for (long k = 0; k < threads && k < 256; k++) pthread_create(&t[k], NULL, lane, (void *)k);
  for (long k = 0; k < threads && k < 256; k++) pthread_join(t[k], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("%s %d threads: %.2f GB/s (%.3f s for %.2f GiB)\n", thp ? "thp" : "4k", threads,
         len / s / 1e9, s, len / (double)(1 << 30));
  munmap(base, len);
  return 0;
}
