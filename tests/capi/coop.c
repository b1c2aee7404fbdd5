/* C11 client of gantry_loader_load_cooperative and gantry_loader_load_cooperative_split, as a
 * server running one process (here: one thread) per GPU calls them. It opens the CUDA driver and NCCL itself with dlopen (no CUDA
 * headers or libraries at build time), reads every tensor back from the GPU and compares it
 * with its own read of the file.
 *
 *   coop args FILE                 argument errors, which need no GPU
 *   coop alone FILE                rank 1 of 2 without a communicator reads everything itself
 *   coop world1 FILE LIBNCCL       a communicator of one rank: nothing to share, read alone
 *   coop pair FILE LIBNCCL         two ranks on GPUs 0 and 1 (two threads) share a unique id,
 *                                  split the reads and exchange them over NCCL: whole tensors,
 *                                  then each rank keeping its rows (GANTRY_SPLIT_DIM0)
 *
 * Each mode prints "coop MODE: ok", or "skipped: REASON" and exits 0 when the machine lacks
 * what it needs (the test harness decides whether a skip is allowed). */
#include "check.h"
#include "cuda_driver.h"
#include "gantry.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ncclUniqueId and the NCCL entry points used, as nccl.h declares them. */
typedef struct {
    char internal[128];
} nccl_unique_id;
typedef int (*nccl_get_unique_id_fn)(nccl_unique_id *);
typedef int (*nccl_comm_init_rank_fn)(void **, int, nccl_unique_id, int);
typedef int (*nccl_comm_destroy_fn)(void *);

static struct {
    nccl_get_unique_id_fn get_unique_id;
    nccl_comm_init_rank_fn comm_init_rank;
    nccl_comm_destroy_fn comm_destroy;
} nccl;

static void skip(const char *why) {
    printf("skipped: %s\n", why);
    exit(0);
}

/* The CUDA driver and the number of GPUs, or a skip saying why not. */
static int open_cuda(void) {
    const char *why = "";
    int count = cuda_gpus(&why);
    if (count == 0) {
        skip(why);
    }
    return count;
}

static void open_nccl(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    CHECK(lib != NULL, "dlopen %s: %s", path, dlerror());
    *(void **)&nccl.get_unique_id = symbol(lib, "ncclGetUniqueId");
    *(void **)&nccl.comm_init_rank = symbol(lib, "ncclCommInitRank");
    *(void **)&nccl.comm_destroy = symbol(lib, "ncclCommDestroy");
}

static unsigned char *read_file_range(const char *path, uint64_t offset, uint64_t len) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "open %s", path);
    unsigned char *buf = malloc(len ? len : 1);
    CHECK(fseek(f, (long)offset, SEEK_SET) == 0 && fread(buf, 1, len, f) == len, "read %s", path);
    fclose(f);
    return buf;
}

/* A tensor as a verified whole load saw it: bytes, dimensions and rows. */
struct whole {
    uint64_t bytes;
    uint32_t ndim;
    uint64_t rows;
};

/* One rank's call and what came of it. */
struct rank {
    const char *path;
    int ordinal;
    void *comm;
    int rank;
    int world;
    size_t ready;
    gantry_status status;
    char message[512];
    gantry_coop_report report;
    uint64_t tensor_bytes;
    struct whole *table; /* per tensor index, from the whole load */
    size_t count;
};

static void on_ready(void *user, const gantry_tensor *t) {
    struct rank *r = user;
    CHECK(t->data != 0 || t->bytes == 0, "ready tensor %s has an address", t->name);
    r->ready++;
}

/* The `t.bytes` bytes at GPU address `t.data` equal the file's at `at`. */
static void compare(const gantry_tensor *t, uint64_t at) {
    unsigned char *want = read_file_range(t->file, at, t->bytes);
    unsigned char *got = malloc(t->bytes ? t->bytes : 1);
    if (t->bytes) {
        CHECK(cu.memcpy_dtoh(got, t->data, t->bytes) == 0, "cuMemcpyDtoH of %s", t->name);
    }
    CHECK(memcmp(got, want, t->bytes) == 0, "tensor %s differs from the file", t->name);
    free(got);
    free(want);
}

/* Every tensor of `model`, copied back from GPU memory, equals this program's read; their
 * sizes go to `r->table`. */
static uint64_t check_bytes(struct rank *r, const gantry_model *model) {
    size_t count = 0;
    uint64_t total = 0;
    expect(gantry_model_tensor_count(model, &count), GANTRY_OK, "tensor count");
    r->table = calloc(count ? count : 1, sizeof *r->table);
    r->count = count;
    for (size_t i = 0; i < count; i++) {
        gantry_tensor t;
        expect(gantry_model_tensor(model, i, &t), GANTRY_OK, "tensor");
        compare(&t, t.file_offset);
        r->table[t.index] = (struct whole){t.bytes, t.ndim, t.ndim ? t.shape[0] : 0};
        total += t.bytes;
    }
    return total;
}

/* Each share of `placed` (rank `r->rank` of 2 under GANTRY_SPLIT_DIM0) equals its rows of the
 * file: half the rows of a tensor of two or more dimensions with even rows, else all of it. */
static uint64_t check_shares(const struct rank *r, const struct whole *table, const gantry_placed *placed) {
    size_t count = 0;
    uint64_t total = 0;
    expect(gantry_placed_tensor_count(placed, 0, &count), GANTRY_OK, "share count");
    for (size_t i = 0; i < count; i++) {
        gantry_tensor t;
        expect(gantry_placed_tensor(placed, 0, i, &t), GANTRY_OK, "share");
        const struct whole *w = &table[t.index];
        int split = w->ndim >= 2 && w->rows % 2 == 0;
        uint64_t want = split ? w->bytes / 2 : w->bytes;
        CHECK(t.bytes == want, "rank %d: share of %s has %llu bytes, want %llu", r->rank, t.name,
              (unsigned long long)t.bytes, (unsigned long long)want);
        CHECK(!split || t.shape[0] == w->rows / 2, "rank %d: %s has %llu rows", r->rank, t.name,
              (unsigned long long)t.shape[0]);
        compare(&t, t.file_offset + (split ? (uint64_t)r->rank * want : 0));
        total += t.bytes;
    }
    return total;
}

/* Runs one rank: binds its GPU, loads, checks every byte against the file. */
static void *run_rank(void *arg) {
    struct rank *r = arg;
    cuda_bind(r->ordinal);
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_model *model = NULL;
    r->status = gantry_loader_load_cooperative(loader, r->path, r->ordinal, r->comm, r->rank,
                                               r->world, on_ready, r, &model, &r->report);
    gantry_last_error_message(r->message, sizeof r->message);
    if (r->status == GANTRY_OK) {
        r->tensor_bytes = check_bytes(r, model);
        CHECK(r->ready == r->count, "rank %d: %zu tensors ready, %zu loaded", r->rank, r->ready,
              r->count);
        gantry_model_free(model);
    }
    gantry_loader_free(loader);
    return NULL;
}

/* One rank keeping its rows, after its whole load (`whole->table`: the tensors' sizes). */
struct split_rank {
    struct rank *whole;
    gantry_status status;
    char message[512];
    gantry_coop_report report;
    uint64_t share_bytes;
};

static void *run_split(void *arg) {
    struct split_rank *s = arg;
    struct rank *r = s->whole;
    cuda_bind(r->ordinal);
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_placed *placed = NULL;
    s->status = gantry_loader_load_cooperative_split(loader, r->path, r->ordinal, r->comm, r->rank,
                                                     r->world, GANTRY_SPLIT_DIM0, &placed,
                                                     &s->report);
    gantry_last_error_message(s->message, sizeof s->message);
    if (s->status == GANTRY_OK) {
        s->share_bytes = check_shares(r, r->table, placed);
        gantry_placed_free(placed);
    }
    gantry_loader_free(loader);
    return NULL;
}

static void args(const char *path) {
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_model *model = NULL;
    gantry_coop_report report;
    expect(gantry_loader_load_cooperative(NULL, path, 0, NULL, 0, 1, NULL, NULL, &model, NULL),
           GANTRY_E_NULL_ARGUMENT, "NULL loader");
    expect(gantry_loader_load_cooperative(loader, NULL, 0, NULL, 0, 1, NULL, NULL, &model, NULL),
           GANTRY_E_NULL_ARGUMENT, "NULL path");
    expect(gantry_loader_load_cooperative(loader, path, 0, NULL, 0, 1, NULL, NULL, NULL, NULL),
           GANTRY_E_NULL_ARGUMENT, "NULL model_out");
    expect(gantry_loader_load_cooperative(loader, path, 0, NULL, 2, 2, NULL, NULL, &model, &report),
           GANTRY_E_INVALID_ARGUMENT, "rank 2 of 2");
    expect(gantry_loader_load_cooperative(loader, path, 0, NULL, -1, 2, NULL, NULL, &model, NULL),
           GANTRY_E_INVALID_ARGUMENT, "rank -1");
    expect(gantry_loader_load_cooperative(loader, path, 0, NULL, 0, 0, NULL, NULL, &model, NULL),
           GANTRY_E_INVALID_ARGUMENT, "world 0");
    expect(gantry_loader_load_cooperative(loader, path, GANTRY_DEVICE_HOST, NULL, 0, 1, NULL, NULL,
                                          &model, NULL),
           GANTRY_E_INVALID_ARGUMENT, "host destination");
    CHECK(model == NULL, "model_out untouched on failure");
    gantry_placed *placed = NULL;
    expect(gantry_loader_load_cooperative_split(loader, path, 0, NULL, 0, 2, 7, &placed, NULL),
           GANTRY_E_INVALID_ARGUMENT, "split 7");
    expect(gantry_loader_load_cooperative_split(loader, path, 0, NULL, 0, 2, GANTRY_SPLIT_TP, NULL,
                                                NULL),
           GANTRY_E_NULL_ARGUMENT, "NULL placed_out");
    expect(gantry_loader_load_cooperative_split(loader, path, 0, NULL, 3, 2, GANTRY_SPLIT_TP,
                                                &placed, NULL),
           GANTRY_E_INVALID_ARGUMENT, "rank 3 of 2");
    CHECK(placed == NULL, "placed_out untouched on failure");
    gantry_loader_free(loader);
}

/* A rank that reads alone: with no communicator, or a communicator of one rank. */
static void alone(struct rank *r) {
    run_rank(r);
    CHECK(r->status == GANTRY_OK, "%s: %s", gantry_status_name(r->status), r->message);
    CHECK(r->report.cooperative == 0, "read alone");
    CHECK(r->report.rank == r->rank && r->report.world == r->world, "rank and world reported");
    CHECK(r->report.received_bytes == 0, "nothing received");
    CHECK(r->report.owned_bytes == r->tensor_bytes, "every byte its own: %llu of %llu",
          (unsigned long long)r->report.owned_bytes, (unsigned long long)r->tensor_bytes);
    free(r->table);
}

static void world1(const char *path, const char *libnccl) {
    open_nccl(libnccl);
    cuda_bind(0);
    nccl_unique_id id;
    void *comm = NULL;
    CHECK(nccl.get_unique_id(&id) == 0, "ncclGetUniqueId");
    CHECK(nccl.comm_init_rank(&comm, 1, id, 0) == 0, "ncclCommInitRank (world 1)");
    struct rank r = {.path = path, .ordinal = 0, .comm = comm, .rank = 0, .world = 1};
    alone(&r);
    CHECK(nccl.comm_destroy(comm) == 0, "ncclCommDestroy");
}

/* One rank joining the communicator of `pair` on its own GPU. */
struct join {
    int ordinal;
    nccl_unique_id id;
    void **comm;
    int result;
};

static void *join_rank(void *arg) {
    struct join *j = arg;
    cuda_bind(j->ordinal);
    j->result = nccl.comm_init_rank(j->comm, 2, j->id, j->ordinal);
    return NULL;
}

static void pair(const char *path, const char *libnccl) {
    open_nccl(libnccl);
    nccl_unique_id id;
    CHECK(nccl.get_unique_id(&id) == 0, "ncclGetUniqueId");
    struct rank ranks[2];
    void *comms[2] = {NULL, NULL};
    /* The communicators are made as a server makes them: every rank joins at once. */
    pthread_t threads[2];
    struct join joins[2];
    for (int i = 0; i < 2; i++) {
        joins[i] = (struct join){.ordinal = i, .id = id, .comm = &comms[i], .result = -1};
    }
    for (int i = 0; i < 2; i++) {
        CHECK(pthread_create(&threads[i], NULL, join_rank, &joins[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(threads[i], NULL);
        CHECK(joins[i].result == 0, "ncclCommInitRank rank %d: %d", i, joins[i].result);
    }
    for (int i = 0; i < 2; i++) {
        ranks[i] = (struct rank){.path = path, .ordinal = i, .comm = comms[i], .rank = i, .world = 2};
        CHECK(pthread_create(&threads[i], NULL, run_rank, &ranks[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(threads[i], NULL);
    }
    uint64_t owned = 0;
    for (int i = 0; i < 2; i++) {
        struct rank *r = &ranks[i];
        CHECK(r->status == GANTRY_OK, "rank %d: %s: %s", i, gantry_status_name(r->status), r->message);
        CHECK(r->report.cooperative == 1, "rank %d cooperated", i);
        CHECK(r->report.owned_bytes + r->report.received_bytes == r->tensor_bytes,
              "rank %d: %llu owned + %llu received != %llu", i,
              (unsigned long long)r->report.owned_bytes,
              (unsigned long long)r->report.received_bytes, (unsigned long long)r->tensor_bytes);
        owned += r->report.owned_bytes;
    }
    CHECK(owned == ranks[0].tensor_bytes, "every byte read by one rank: %llu of %llu",
          (unsigned long long)owned, (unsigned long long)ranks[0].tensor_bytes);
    /* The same communicators again, each rank keeping its rows. */
    struct split_rank splits[2];
    for (int i = 0; i < 2; i++) {
        splits[i] = (struct split_rank){.whole = &ranks[i]};
        CHECK(pthread_create(&threads[i], NULL, run_split, &splits[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(threads[i], NULL);
    }
    owned = 0;
    for (int i = 0; i < 2; i++) {
        struct split_rank *s = &splits[i];
        CHECK(s->status == GANTRY_OK, "split rank %d: %s: %s", i, gantry_status_name(s->status),
              s->message);
        CHECK(s->report.cooperative == 1, "split rank %d cooperated", i);
        CHECK(s->share_bytes < ranks[i].tensor_bytes, "rank %d keeps less than everything", i);
        owned += s->report.owned_bytes;
        CHECK(nccl.comm_destroy(comms[i]) == 0, "ncclCommDestroy rank %d", i);
        free(ranks[i].table);
    }
    CHECK(owned == ranks[0].tensor_bytes, "split: every byte read by one rank: %llu of %llu",
          (unsigned long long)owned, (unsigned long long)ranks[0].tensor_bytes);
}

int main(int argc, char **argv) {
    CHECK(argc >= 3, "usage: coop args|alone|world1|pair FILE [LIBNCCL]");
    const char *mode = argv[1], *path = argv[2];
    if (strcmp(mode, "args") == 0) {
        args(path);
    } else if (strcmp(mode, "alone") == 0) {
        open_cuda();
        struct rank r = {.path = path, .ordinal = 0, .comm = NULL, .rank = 1, .world = 2};
        alone(&r);
    } else if (strcmp(mode, "world1") == 0) {
        CHECK(argc == 4, "world1 needs LIBNCCL");
        open_cuda();
        world1(path, argv[3]);
    } else if (strcmp(mode, "pair") == 0) {
        CHECK(argc == 4, "pair needs LIBNCCL");
        if (open_cuda() < 2) {
            skip("fewer than two GPUs");
        }
        pair(path, argv[3]);
    } else {
        CHECK(0, "unknown mode %s", mode);
    }
    printf("coop %s: ok\n", mode);
    return 0;
}
