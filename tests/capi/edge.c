/* C11 client of the gantry C ABI for the edges of its contract, each checked against this
 * program's own read of the file:
 * - empty tensors given a NULL destination by `gantry_loader_load_into`: loaded, and each
 *   tensor reported ready exactly once;
 * - names with a NUL inside: `gantry_model_find` and `gantry_placed_find` match names exactly,
 *   so "a?b" never finds "a\0b"; `gantry_model_find_bytes` finds it by its length;
 * - a checkpoint of many tensors: loaded, and every tensor found by its name.
 * Usage: edge EMPTY.safetensors NUL.safetensors BOTH.safetensors MANY.safetensors COUNT
 *   EMPTY: w (F32 [4]), e1 (F32 [0]), e2 (F16 [0, 4]);
 *   NUL: "a\0b" (U8 [3]), c (U8 [1]);  BOTH: "a\0b" (U8 [3]), "a?b" (U8 [5]);
 *   MANY: COUNT tensors of one byte. */
#define _POSIX_C_SOURCE 199309L
#include "check.h"
#include "gantry.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The whole file. */
static unsigned char *read_all(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "open %s", path);
    CHECK(fseek(f, 0, SEEK_END) == 0, "seek %s", path);
    long len = ftell(f);
    CHECK(len > 0 && fseek(f, 0, SEEK_SET) == 0, "size of %s", path);
    unsigned char *buf = malloc((size_t)len);
    CHECK(buf != NULL && fread(buf, 1, (size_t)len, f) == (size_t)len, "read %s", path);
    fclose(f);
    *len_out = (size_t)len;
    return buf;
}

/* The tensor's bytes are the file's at its offset. */
static void check_bytes(const unsigned char *file, size_t file_len, const gantry_tensor *t, const char *what) {
    CHECK(t->file_offset + t->bytes <= file_len, "%s: offset %llu past the file", what,
          (unsigned long long)t->file_offset);
    CHECK(t->bytes == 0 || memcmp((const void *)(uintptr_t)t->data, file + t->file_offset, t->bytes) == 0,
          "%s: bytes differ from the file", what);
}

struct empty_targets {
    unsigned char *buffers[3];
    int ready[3];
};

static int32_t choose_null_for_empty(void *user, const gantry_tensor *t, uint64_t *dest_out) {
    struct empty_targets *targets = user;
    CHECK(t->index < 3, "index %llu", (unsigned long long)t->index);
    targets->buffers[t->index] = t->bytes ? malloc(t->bytes) : NULL;
    *dest_out = (uint64_t)(uintptr_t)targets->buffers[t->index];
    return 1;
}

static void count_ready(void *user, const gantry_tensor *t) {
    struct empty_targets *targets = user;
    CHECK(t->index < 3, "ready index %llu", (unsigned long long)t->index);
    CHECK(t->data == (uint64_t)(uintptr_t)targets->buffers[t->index], "ready names its destination");
    targets->ready[t->index]++;
}

static void empty_tensors(gantry_loader *loader, const char *path) {
    struct empty_targets targets = {{NULL, NULL, NULL}, {0, 0, 0}};
    gantry_report report;
    expect(gantry_loader_load_into(loader, path, GANTRY_DEVICE_HOST, choose_null_for_empty, count_ready, &targets,
                                   &report),
           GANTRY_OK, "load_into with NULL for the empty tensors");
    for (int i = 0; i < 3; i++) {
        CHECK(targets.ready[i] == 1, "tensor %d reported ready %d times", i, targets.ready[i]);
    }
    CHECK(report.tensor_bytes == 16, "tensor bytes %llu", (unsigned long long)report.tensor_bytes);
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, path, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "offsets");
    gantry_tensor w;
    expect(gantry_model_find(model, "w", &w), GANTRY_OK, "find w");
    size_t len = 0;
    unsigned char *file = read_all(path, &len);
    CHECK(targets.buffers[w.index] != NULL && memcmp(targets.buffers[w.index], file + w.file_offset, 16) == 0,
          "bytes of w in its destination");
    free(file);
    free(targets.buffers[w.index]);
    gantry_model_free(model);
    printf("empty tensors: ok\n");
}

static const char NUL_NAME[3] = {'a', '\0', 'b'};

static void nul_names(gantry_loader *loader, const char *nul, const char *both) {
    size_t len = 0;
    unsigned char *file = read_all(nul, &len);
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, nul, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "load NUL names");
    gantry_tensor t, untouched = {0};
    t = untouched;
    expect(gantry_model_find(model, "a?b", &t), GANTRY_E_NOT_FOUND, "\"a?b\" does not name \"a\\0b\"");
    CHECK(t.data == 0, "tensor_out untouched");
    expect(gantry_model_find(model, "a", &t), GANTRY_E_NOT_FOUND, "\"a\" does not name \"a\\0b\"");
    expect(gantry_model_find_bytes(model, NUL_NAME, 1, &t), GANTRY_E_NOT_FOUND, "a prefix is not the name");
    expect(gantry_model_find_bytes(model, NUL_NAME, 3, &t), GANTRY_OK, "find \"a\\0b\" by its bytes");
    CHECK(t.bytes == 3 && strcmp(t.name, "a?b") == 0, "\"a\\0b\": %llu bytes, shown as %s",
          (unsigned long long)t.bytes, t.name);
    check_bytes(file, len, &t, "a\\0b");
    expect(gantry_model_find_bytes(model, "c", 1, &t), GANTRY_OK, "find c by its bytes");
    CHECK(t.bytes == 1, "c is one byte");
    expect(gantry_model_find_bytes(model, NULL, 3, &t), GANTRY_E_NULL_ARGUMENT, "NULL name with a length");
    gantry_model_free(model);
    const int32_t host[1] = {GANTRY_DEVICE_HOST};
    gantry_placed *placed = NULL;
    expect(gantry_loader_load_split(loader, nul, host, 1, GANTRY_SPLIT_REPLICATE, &placed), GANTRY_OK, "placed");
    expect(gantry_placed_find(placed, 0, "a?b", &t), GANTRY_E_NOT_FOUND, "placed: \"a?b\" is not \"a\\0b\"");
    gantry_placed_free(placed);
    free(file);

    file = read_all(both, &len);
    expect(gantry_loader_load(loader, both, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "load both names");
    expect(gantry_model_find(model, "a?b", &t), GANTRY_OK, "find the real \"a?b\"");
    CHECK(t.bytes == 5, "\"a?b\" is the 5-byte tensor, got %llu bytes", (unsigned long long)t.bytes);
    check_bytes(file, len, &t, "a?b");
    expect(gantry_model_find_bytes(model, NUL_NAME, 3, &t), GANTRY_OK, "find \"a\\0b\" next to \"a?b\"");
    CHECK(t.bytes == 3, "\"a\\0b\" is the 3-byte tensor");
    check_bytes(file, len, &t, "a\\0b");
    gantry_model_free(model);
    expect(gantry_loader_load_split(loader, both, host, 1, GANTRY_SPLIT_REPLICATE, &placed), GANTRY_OK, "placed");
    expect(gantry_placed_find(placed, 0, "a?b", &t), GANTRY_OK, "placed: the real \"a?b\"");
    CHECK(t.bytes == 5, "placed \"a?b\" is the 5-byte tensor, got %llu", (unsigned long long)t.bytes);
    check_bytes(file, len, &t, "placed a?b");
    gantry_placed_free(placed);
    free(file);
    printf("NUL names: ok\n");
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void many_tensors(gantry_loader *loader, const char *path, size_t want) {
    size_t len = 0;
    unsigned char *file = read_all(path, &len);
    double start = seconds();
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, path, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "load many tensors");
    double loaded = seconds();
    size_t count = 0;
    expect(gantry_model_tensor_count(model, &count), GANTRY_OK, "count");
    CHECK(count == want, "%zu tensors, want %zu", count, want);
    for (size_t i = 0; i < count; i++) {
        gantry_tensor t, found;
        expect(gantry_model_tensor(model, i, &t), GANTRY_OK, "tensor");
        expect(gantry_model_find(model, t.name, &found), GANTRY_OK, "find by name");
        CHECK(found.index == t.index && found.data == t.data, "find(%s) gives its own tensor", t.name);
        check_bytes(file, len, &t, t.name);
    }
    /* Information only, never asserted. */
    printf("many tensors: ok (%zu tensors: load %.2f s, every find %.2f s)\n", count, loaded - start,
           seconds() - loaded);
    gantry_model_free(model);
    free(file);
}

int main(int argc, char **argv) {
    CHECK(argc == 6, "usage: edge EMPTY NUL BOTH MANY COUNT");
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader_new");
    empty_tensors(loader, argv[1]);
    nul_names(loader, argv[2], argv[3]);
    many_tensors(loader, argv[4], (size_t)strtoull(argv[5], NULL, 10));
    gantry_loader_free(loader);
    printf("edge: ok\n");
    return 0;
}
