/* C11 smoke client of the gantry C ABI: load a checkpoint into host memory, enumerate its
 * tensors, check every byte against this program's own read of the file, load into its own
 * buffers through the callback API, place it across two destinations (split by rows, and by
 * a callback), and hit every error family. Without CUDA, a GPU load must
 * return a status, not abort. With five more arguments, the same file from an S3 store: loaded
 * through key=value options, compared with the local file, a missing object and wrong
 * credentials as errors (the secret never in the message).
 * Usage: smoke GOOD.safetensors CORRUPT.safetensors [URL MISSING_URL ENDPOINT KEY_ID SECRET] */
#include "check.h"
#include "gantry.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(gantry_tensor) == 72, "gantry_tensor layout");
_Static_assert(sizeof(gantry_config) == 40, "gantry_config layout");
_Static_assert(sizeof(gantry_report) == 32, "gantry_report layout");
_Static_assert(GANTRY_OK == 0 && GANTRY_E_NULL_ARGUMENT == 100 && GANTRY_E_INVALID_ARGUMENT == 101 &&
                   GANTRY_E_NOT_FOUND == 102 && GANTRY_E_DESTINATION == 103 && GANTRY_E_FORMAT == 200 &&
                   GANTRY_E_IO == 300 && GANTRY_E_TRUNCATED == 301 && GANTRY_E_INTEGRITY == 302 &&
                   GANTRY_E_CUDA == 400 &&
                   GANTRY_E_CUFILE == 500 && GANTRY_E_UNAVAILABLE == 600 && GANTRY_E_RESOURCE == 601 &&
                   GANTRY_E_PANIC == 900,
               "status values are stable");
_Static_assert(GANTRY_PATH_AUTO == 0 && GANTRY_PATH_DIRECT == 1 && GANTRY_PATH_BUFFERED == 2, "paths");

static unsigned char *read_file_range(const char *path, uint64_t offset, uint64_t len) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "open %s", path);
    unsigned char *buf = malloc(len ? len : 1);
    CHECK(fseek(f, (long)offset, SEEK_SET) == 0 && fread(buf, 1, len, f) == len, "read %s", path);
    fclose(f);
    return buf;
}

struct targets {
    unsigned char *buffers[16];
    int ready;
};

static int32_t choose(void *user, const gantry_tensor *t, uint64_t *dest_out) {
    struct targets *targets = user;
    CHECK(t->index < 16, "index");
    targets->buffers[t->index] = malloc(t->bytes ? t->bytes : 1);
    *dest_out = (uint64_t)(uintptr_t)targets->buffers[t->index];
    return 1;
}

static void landed(void *user, const gantry_tensor *t) {
    struct targets *targets = user;
    CHECK(t->data == (uint64_t)(uintptr_t)targets->buffers[t->index], "ready names its destination");
    targets->ready++;
}

/* Loads SOURCE into host memory: two tensors, each naming SOURCE as its file and holding the
 * bytes of LOCAL (the same file, or its local copy) at its offset. */
static gantry_model *load_and_check(gantry_loader *loader, const char *source, const char *local) {
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, source, GANTRY_DEVICE_HOST, &model), GANTRY_OK, source);
    size_t count = 0;
    expect(gantry_model_tensor_count(model, &count), GANTRY_OK, "count");
    CHECK(count == 2, "2 tensors from %s, got %zu", source, count);
    for (size_t i = 0; i < count; i++) {
        gantry_tensor t;
        expect(gantry_model_tensor(model, i, &t), GANTRY_OK, "tensor");
        CHECK(strcmp(t.file, source) == 0, "file of %s: %s", t.name, t.file);
        unsigned char *expected = read_file_range(local, t.file_offset, t.bytes);
        CHECK(memcmp((const void *)(uintptr_t)t.data, expected, t.bytes) == 0, "bytes of %s from %s", t.name, source);
        free(expected);
    }
    return model;
}

/* Each of the two buffers `choose` handed out holds its tensor's bytes of GOOD (a fresh load
 * of the local file gives each tensor's offset); frees them. */
static void check_and_free(gantry_loader *loader, const char *good, struct targets *targets, const char *what) {
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, good, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "offsets from the local file");
    for (size_t i = 0; i < 2; i++) {
        gantry_tensor t;
        expect(gantry_model_tensor(model, i, &t), GANTRY_OK, "tensor");
        unsigned char *expected = read_file_range(good, t.file_offset, t.bytes);
        CHECK(memcmp(targets->buffers[t.index], expected, t.bytes) == 0, "%s of %s", what, t.name);
        free(expected);
        free(targets->buffers[t.index]);
    }
    gantry_model_free(model);
}

/* Destination 0: rows 8..12 of w; destination 1: b whole; nothing else. */
static int32_t place_some(void *user, const gantry_tensor *t, size_t destination, gantry_share *share) {
    int *calls = user;
    (*calls)++;
    if (strcmp(t->name, "w") == 0 && destination == 0) {
        share->whole = 0;
        share->dim = 0;
        share->start = 8;
        share->len = 4;
        return 1;
    }
    if (strcmp(t->name, "b") == 0 && destination == 1) {
        share->whole = 1;
        return 1;
    }
    return 0;
}

static int32_t place_refuse(void *user, const gantry_tensor *t, size_t destination, gantry_share *share) {
    (void)user, (void)t, (void)destination, (void)share;
    return -1;
}

/* Placed loads across two host destinations, each share against the file's bytes. */
static void placed(gantry_loader *loader, const char *good) {
    const int32_t host[2] = {GANTRY_DEVICE_HOST, GANTRY_DEVICE_HOST};
    gantry_placed *p = NULL;
    expect(gantry_loader_load_split(loader, good, host, 2, GANTRY_SPLIT_DIM0, &p), GANTRY_OK, "split by rows");
    size_t n = 0;
    expect(gantry_placed_destinations(p, &n), GANTRY_OK, "destinations");
    CHECK(n == 2, "2 destinations, got %zu", n);
    for (size_t d = 0; d < 2; d++) {
        size_t count = 0;
        expect(gantry_placed_tensor_count(p, d, &count), GANTRY_OK, "share count");
        CHECK(count == 2, "2 shares on %zu, got %zu", d, count);
        gantry_tensor w, b;
        expect(gantry_placed_find(p, d, "w", &w), GANTRY_OK, "find w share");
        CHECK(w.ndim == 2 && w.shape[0] == 16 && w.shape[1] == 64 && w.bytes == 2048, "w share shape on %zu", d);
        unsigned char *rows = read_file_range(good, w.file_offset + d * 2048, 2048);
        CHECK(memcmp((const void *)(uintptr_t)w.data, rows, 2048) == 0, "rows of w on %zu", d);
        free(rows);
        expect(gantry_placed_find(p, d, "b", &b), GANTRY_OK, "find b");
        unsigned char *whole = read_file_range(good, b.file_offset, 20);
        CHECK(b.bytes == 20 && memcmp((const void *)(uintptr_t)b.data, whole, 20) == 0, "b whole on %zu", d);
        free(whole);
    }
    gantry_report report;
    expect(gantry_placed_report(p, &report), GANTRY_OK, "placed report");
    CHECK(report.read_bytes == 4096 + 20, "read once: %llu", (unsigned long long)report.read_bytes);
    gantry_tensor none;
    expect(gantry_placed_tensor(p, 2, 0, &none), GANTRY_E_NOT_FOUND, "destination out of range");
    expect(gantry_placed_tensor(p, 0, 2, &none), GANTRY_E_NOT_FOUND, "share out of range");
    gantry_placed_free(p);

    /* By columns in host memory: each row of w's share is half a row of the file. */
    expect(gantry_loader_load_split(loader, good, host, 2, GANTRY_SPLIT_DIM1, &p), GANTRY_OK, "split by columns");
    for (size_t d = 0; d < 2; d++) {
        gantry_tensor w;
        expect(gantry_placed_find(p, d, "w", &w), GANTRY_OK, "find w columns");
        CHECK(w.shape[0] == 32 && w.shape[1] == 32 && w.bytes == 2048, "w columns shape on %zu", d);
        unsigned char *all = read_file_range(good, w.file_offset, 4096);
        for (size_t r = 0; r < 32; r++) {
            const unsigned char *row = (const unsigned char *)(uintptr_t)w.data + r * 64;
            CHECK(memcmp(row, all + r * 128 + d * 64, 64) == 0, "row %zu of w's columns on %zu", r, d);
        }
        free(all);
    }
    gantry_placed_free(p);

    /* The tensor-parallel rule: neither "w" nor "b" is a name it splits, so both go whole. */
    expect(gantry_loader_load_split(loader, good, host, 2, GANTRY_SPLIT_TP, &p), GANTRY_OK, "tp split");
    for (size_t d = 0; d < 2; d++) {
        gantry_tensor w;
        expect(gantry_placed_find(p, d, "w", &w), GANTRY_OK, "find w under tp");
        CHECK(w.bytes == 4096, "w whole under tp on %zu", d);
        unsigned char *all = read_file_range(good, w.file_offset, 4096);
        CHECK(memcmp((const void *)(uintptr_t)w.data, all, 4096) == 0, "w bytes under tp on %zu", d);
        free(all);
    }
    gantry_placed_free(p);

    int calls = 0;
    expect(gantry_loader_load_placed(loader, good, host, 2, place_some, &calls, &p), GANTRY_OK, "placed by callback");
    CHECK(calls == 4, "asked once per tensor and destination: %d", calls);
    size_t count = 0;
    expect(gantry_placed_tensor_count(p, 0, &count), GANTRY_OK, "count 0");
    CHECK(count == 1, "one share on 0");
    gantry_tensor w;
    expect(gantry_placed_tensor(p, 0, 0, &w), GANTRY_OK, "share 0");
    CHECK(strcmp(w.name, "w") == 0 && w.shape[0] == 4 && w.bytes == 512, "rows 8..12 of w");
    unsigned char *rows = read_file_range(good, w.file_offset + 8 * 128, 512);
    CHECK(memcmp((const void *)(uintptr_t)w.data, rows, 512) == 0, "bytes of rows 8..12");
    free(rows);
    expect(gantry_placed_find(p, 0, "b", &w), GANTRY_E_NOT_FOUND, "b is not on 0");
    expect(gantry_placed_report(p, &report), GANTRY_OK, "report");
    CHECK(report.read_bytes < 4096, "only the rows and b are read: %llu", (unsigned long long)report.read_bytes);
    gantry_placed_free(p);

    gantry_placed *untouched = (gantry_placed *)(uintptr_t)0x1;
    p = untouched;
    expect(gantry_loader_load_placed(loader, good, host, 2, place_refuse, NULL, &p), GANTRY_E_INVALID_ARGUMENT,
           "refused by the callback");
    const int32_t mixed[2] = {GANTRY_DEVICE_HOST, 0};
    expect(gantry_loader_load_split(loader, good, mixed, 2, GANTRY_SPLIT_DIM0, &p), GANTRY_E_INVALID_ARGUMENT,
           "host and GPU mixed");
    expect(gantry_loader_load_split(loader, good, host, 0, GANTRY_SPLIT_DIM0, &p), GANTRY_E_INVALID_ARGUMENT,
           "no destination");
    expect(gantry_loader_load_split(loader, good, host, 2, 9, &p), GANTRY_E_INVALID_ARGUMENT, "unknown split");
    expect(gantry_loader_load_placed(loader, good, host, 2, NULL, NULL, &p), GANTRY_E_NULL_ARGUMENT, "NULL place");
    expect(gantry_loader_load_split(loader, good, NULL, 2, GANTRY_SPLIT_DIM0, &p), GANTRY_E_NULL_ARGUMENT,
           "NULL devices");
    CHECK(p == untouched, "placed_out untouched on failure");
    gantry_placed_free(NULL);

    /* On GPUs: one GPU named twice where there is one; a status whatever the machine has. */
    const int32_t gpus[2] = {0, 0};
    gantry_status gpu = gantry_loader_load_split(loader, good, gpus, 2, GANTRY_SPLIT_DIM1, &p);
    if (gpu == GANTRY_OK) {
        expect(gantry_placed_find(p, 1, "w", &w), GANTRY_OK, "w on the second destination");
        CHECK(w.shape[0] == 32 && w.shape[1] == 32 && w.bytes == 2048, "columns of w");
        gantry_placed_free(p);
        printf("GPU placed load: ok\n");
    } else {
        CHECK(gpu == GANTRY_E_UNAVAILABLE || gpu == GANTRY_E_CUDA, "GPU placed load: %s", gantry_status_name(gpu));
    }
}

/* GOOD was uploaded to URL; MISSING_URL names no object. */
/* args: the object's URL, a missing object's URL, an option with a wrong credential, the
 * right credential's value, then the options that reach the store (any provider's keys). */
static void object_storage(const char *good, char **args, int count) {
    const char *url = args[0], *missing = args[1], *wrong_option = args[2], *secret = args[3];
    const char **options = (const char **)(args + 4);
    size_t option_count = (size_t)(count - 4);
    gantry_loader *loader = NULL;
    expect(gantry_loader_new_with_options(NULL, options, option_count, &loader), GANTRY_OK, "loader for the store");

    gantry_model *model = load_and_check(loader, url, good);
    gantry_model_free(model);

    /* Into this program's buffers, straight from the ranged GETs. */
    struct targets targets = {{0}, 0};
    gantry_report report;
    expect(gantry_loader_load_into(loader, url, GANTRY_DEVICE_HOST, choose, landed, &targets, &report), GANTRY_OK,
           "object load_into");
    CHECK(targets.ready == 2 && report.tensor_bytes == 4096 + 20, "object load_into delivered both");
    check_and_free(loader, good, &targets, "object into buffer");

    char message[1024];
    gantry_model *out = NULL;
    expect(gantry_loader_load(loader, missing, GANTRY_DEVICE_HOST, &out), GANTRY_E_IO, "missing object");
    gantry_last_error_message(message, sizeof message);
    CHECK(strstr(message, missing) != NULL, "the error names the object: %s", message);
    CHECK(out == NULL, "no model for a missing object");
    gantry_loader_free(loader);

    /* Later options override earlier ones: the wrong credential last. */
    const char *wrong[32];
    CHECK(option_count < 32, "at most 31 options");
    memcpy(wrong, options, option_count * sizeof *options);
    wrong[option_count] = wrong_option;
    expect(gantry_loader_new_with_options(NULL, wrong, option_count + 1, &loader), GANTRY_OK,
           "loader with a wrong credential");
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &out), GANTRY_E_IO, "wrong credentials");
    gantry_last_error_message(message, sizeof message);
    const char *wrong_value = strchr(wrong_option, '=') + 1;
    CHECK(strstr(message, wrong_value) == NULL && strstr(message, secret) == NULL,
          "no secret in the error: %s", message);
    gantry_loader_free(loader);
    printf("object storage: ok\n");
}

/* verify_sha256=1: with no digest known the load succeeds; a SHA256SUMS beside the file with
 * another digest for it fails the load with GANTRY_E_INTEGRITY, naming both digests. */
static void sha256_check(const char *good) {
    const char *on[] = {"verify_sha256=1"};
    gantry_loader *loader = NULL;
    expect(gantry_loader_new_with_options(NULL, on, 1, &loader), GANTRY_OK, "verify_sha256 loader");
    gantry_model *model = load_and_check(loader, good, good);
    gantry_model_free(model);

    char sums[4096];
    const char *slash = strrchr(good, '/');
    const char *name = slash ? slash + 1 : good;
    int dir_len = slash ? (int)(slash - good + 1) : 0;
    CHECK(snprintf(sums, sizeof sums, "%.*sSHA256SUMS", dir_len, good) < (int)sizeof sums, "path length");
    FILE *f = fopen(sums, "w");
    CHECK(f != NULL, "writing %s", sums);
    const char *zeros = "0000000000000000000000000000000000000000000000000000000000000000";
    fprintf(f, "%s  %s\n", zeros, name);
    fclose(f);
    gantry_model *out = NULL;
    expect(gantry_loader_load(loader, good, GANTRY_DEVICE_HOST, &out), GANTRY_E_INTEGRITY, "wrong digest");
    char message[1024];
    gantry_last_error_message(message, sizeof message);
    CHECK(strstr(message, zeros) != NULL && strstr(message, name) != NULL, "message: %s", message);
    remove(sums);
    gantry_loader_free(loader);

    const char *bad[] = {"verify_sha256=maybe"};
    gantry_loader *bad_loader = NULL;
    expect(gantry_loader_new_with_options(NULL, bad, 1, &bad_loader), GANTRY_E_INVALID_ARGUMENT,
           "verify_sha256 value");
    CHECK(bad_loader == NULL, "loader_out untouched on failure");
}

int main(int argc, char **argv) {
    CHECK(argc == 3 || argc >= 8, "usage: smoke GOOD CORRUPT [URL MISSING_URL WRONG_OPTION SECRET OPTION...]");
    const char *good = argv[1], *corrupt = argv[2];
    CHECK(gantry_abi_version() == GANTRY_ABI_VERSION, "ABI version");
    CHECK(strcmp(gantry_version(), GANTRY_VERSION) == 0, "version %s vs %s", gantry_version(), GANTRY_VERSION);

    gantry_config config;
    expect(gantry_config_init(&config), GANTRY_OK, "config_init");
    config.chunk_bytes = 1 << 20;
    config.staging_bytes = 4 << 20;
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(&config, &loader), GANTRY_OK, "loader_new");

    /* Host load, every byte against our own read. */
    gantry_model *model = load_and_check(loader, good, good);
    size_t count = 0;
    gantry_tensor w;
    expect(gantry_model_find(model, "w", &w), GANTRY_OK, "find");
    CHECK(strcmp(w.dtype, "BF16") == 0 && w.ndim == 2 && w.shape[0] == 32 && w.shape[1] == 64 && w.bytes == 4096,
          "w described");
    gantry_report report;
    expect(gantry_model_report(model, &report), GANTRY_OK, "report");
    CHECK(report.tensor_bytes == 4096 + 20, "report bytes");
    gantry_tensor untouched = w;
    expect(gantry_model_find(model, "nope", &untouched), GANTRY_E_NOT_FOUND, "find missing");
    CHECK(untouched.data == w.data, "outputs are written only on success");
    expect(gantry_model_tensor(model, 2, &untouched), GANTRY_E_NOT_FOUND, "position out of range");
    gantry_model_free(model);

    /* Into our own buffers, through the callbacks. */
    struct targets targets = {{0}, 0};
    expect(gantry_loader_load_into(loader, good, GANTRY_DEVICE_HOST, choose, landed, &targets, &report), GANTRY_OK,
           "load_into");
    CHECK(targets.ready == 2, "ready twice, got %d", targets.ready);
    check_and_free(loader, good, &targets, "caller buffer");

    sha256_check(good);

    /* Error families. */
    gantry_model *sentinel = (gantry_model *)(uintptr_t)0x1;
    gantry_model *out = sentinel;
    expect(gantry_loader_load(loader, "/nonexistent/model.safetensors", GANTRY_DEVICE_HOST, &out), GANTRY_E_IO,
           "missing file");
    CHECK(out == sentinel, "model_out untouched on failure");
    CHECK(gantry_last_error_errno() == 2 /* ENOENT */, "errno of a missing file: %d", gantry_last_error_errno());
    CHECK(gantry_last_error_cuda_code() == 0 && gantry_last_error_cufile_code() == 0, "no CUDA or cuFile code");
    size_t full = gantry_last_error_message(NULL, 0);
    char small[8];
    CHECK(gantry_last_error_message(small, sizeof small) == full && full > 7 && strlen(small) == 7,
          "snprintf semantics");
    expect(gantry_loader_load(loader, corrupt, GANTRY_DEVICE_HOST, &out), GANTRY_E_FORMAT, "corrupt header");
    expect(gantry_loader_load(NULL, good, GANTRY_DEVICE_HOST, &out), GANTRY_E_NULL_ARGUMENT, "NULL loader");
    expect(gantry_loader_load(loader, NULL, GANTRY_DEVICE_HOST, &out), GANTRY_E_NULL_ARGUMENT, "NULL path");
    expect(gantry_loader_load(loader, good, GANTRY_DEVICE_HOST, NULL), GANTRY_E_NULL_ARGUMENT, "NULL model_out");
    expect(gantry_loader_load(loader, good, -7, &out), GANTRY_E_INVALID_ARGUMENT, "bad device");
    expect(gantry_loader_load_into(loader, good, GANTRY_DEVICE_HOST, NULL, NULL, NULL, NULL), GANTRY_E_NULL_ARGUMENT,
           "NULL target");
    expect(gantry_config_init(NULL), GANTRY_E_NULL_ARGUMENT, "NULL config_out");
    gantry_config bad = config;
    bad.chunk_bytes = 1000;
    gantry_loader *bad_loader = NULL;
    expect(gantry_loader_new(&bad, &bad_loader), GANTRY_E_INVALID_ARGUMENT, "chunk not aligned");
    bad = config;
    bad.path = 7;
    expect(gantry_loader_new(&bad, &bad_loader), GANTRY_E_INVALID_ARGUMENT, "unknown path");
    CHECK(bad_loader == NULL, "loader_out untouched on failure");
    /* Object-storage options: key=value with a known key. */
    const char *good_options[] = {"aws_region=eu-west-1", "aws_allow_http=true"};
    gantry_loader *s3_loader = NULL;
    expect(gantry_loader_new_with_options(NULL, good_options, 2, &s3_loader), GANTRY_OK,
           "object options");
    CHECK(s3_loader != NULL, "loader with options");
    gantry_loader_free(s3_loader);
    const char *unknown[] = {"aws_no_such_key=1"};
    expect(gantry_loader_new_with_options(NULL, unknown, 1, &bad_loader),
           GANTRY_E_INVALID_ARGUMENT, "unknown object option");
    const char *no_value[] = {"aws_region"};
    expect(gantry_loader_new_with_options(NULL, no_value, 1, &bad_loader),
           GANTRY_E_INVALID_ARGUMENT, "object option without =");
    expect(gantry_loader_new_with_options(NULL, NULL, 1, &bad_loader), GANTRY_E_NULL_ARGUMENT,
           "NULL options");
    CHECK(bad_loader == NULL, "loader_out untouched on failure");
    gantry_loader_free(NULL);
    gantry_model_free(NULL);

    /* A GPU load returns a status whatever the machine has. */
    gantry_status gpu = gantry_loader_load(loader, good, 0, &out);
    if (gpu == GANTRY_OK) {
        expect(gantry_model_tensor_count(out, &count), GANTRY_OK, "gpu count");
        CHECK(count == 2, "gpu tensors");
        gantry_model_free(out);
        printf("GPU load: ok\n");
    } else {
        char message[512];
        gantry_last_error_message(message, sizeof message);
        CHECK(gpu == GANTRY_E_UNAVAILABLE || gpu == GANTRY_E_CUDA, "GPU load: %s", gantry_status_name(gpu));
        printf("GPU load: %s (%s)\n", gantry_status_name(gpu), message);
    }
    placed(loader, good);
    gantry_loader_free(loader);
    if (argc >= 8) {
        object_storage(good, argv + 3, argc - 3);
    }
    printf("smoke: ok\n");
    return 0;
}
