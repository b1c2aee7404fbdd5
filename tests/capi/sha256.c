/* Per file of a load, whether its SHA-256 was checked and against what
 * (gantry_model_file_sha256), and require_sha256=1 failing on a file with no known digest.
 * Arguments: a checkpoint directory of two files whose SHA256SUMS lists the first only, the
 * first file's path and sha256sum digest, the second's. */
#include "check.h"

#include <string.h>

static void hex(const uint8_t digest[32], char out[65]) {
    for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", digest[i]);
}

/* Loads `dir` with `option` (or none); the load's error message goes to `message`. */
static gantry_model *load_with(const char *option, const char *dir, gantry_status want,
                               char message[1024]) {
    gantry_loader *loader = NULL;
    const char *options[] = {option};
    expect(gantry_loader_new_with_options(NULL, options, option ? 1 : 0, &loader), GANTRY_OK,
           "loader");
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, dir, GANTRY_DEVICE_HOST, &model), want, "load");
    gantry_last_error_message(message, 1024);
    gantry_loader_free(loader);
    return model;
}

static void check_file(const gantry_model *model, size_t file, const char *path,
                       int32_t state, const char *digest) {
    gantry_file_sha256 check;
    memset(&check, 0xff, sizeof check);
    expect(gantry_model_file_sha256(model, file, &check), GANTRY_OK, "file sha256");
    CHECK(strcmp(check.path, path) == 0, "file %zu: path %s, want %s", file, check.path, path);
    CHECK(check.state == state, "file %zu: state %d, want %d", file, check.state, state);
    CHECK(check.reserved == 0, "reserved");
    char got[65];
    hex(check.sha256, got);
    CHECK(strcmp(got, digest) == 0, "file %zu: sha256 %s, want %s", file, got, digest);
    size_t n = strlen(check.source);
    if (state == GANTRY_SHA256_VERIFIED)
        CHECK(n >= 10 && strcmp(check.source + n - 10, "SHA256SUMS") == 0, "source %s", check.source);
    if (state == GANTRY_SHA256_UNVERIFIED) CHECK(strstr(check.source, "SHA256SUMS"), "%s", check.source);
    if (state == GANTRY_SHA256_NOT_COMPUTED) CHECK(n == 0, "source %s", check.source);
}

int main(int argc, char **argv) {
    CHECK(argc == 6, "usage: sha256 DIR FIRST FIRST_SHA256 SECOND SECOND_SHA256");
    const char *dir = argv[1];
    const char *zeros = "0000000000000000000000000000000000000000000000000000000000000000";
    char message[1024];

    gantry_model *model = load_with("verify_sha256=1", dir, GANTRY_OK, message);
    size_t files = 0;
    expect(gantry_model_file_count(model, &files), GANTRY_OK, "file count");
    CHECK(files == 2, "%zu files", files);
    check_file(model, 0, argv[2], GANTRY_SHA256_VERIFIED, argv[3]);
    check_file(model, 1, argv[4], GANTRY_SHA256_UNVERIFIED, argv[5]);
    gantry_file_sha256 check;
    expect(gantry_model_file_sha256(model, 2, &check), GANTRY_E_NOT_FOUND, "past the last file");
    expect(gantry_model_file_sha256(model, 0, NULL), GANTRY_E_NULL_ARGUMENT, "NULL check_out");
    expect(gantry_model_file_sha256(NULL, 0, &check), GANTRY_E_NULL_ARGUMENT, "NULL model");
    expect(gantry_model_file_count(model, NULL), GANTRY_E_NULL_ARGUMENT, "NULL count_out");
    gantry_model_free(model);

    model = load_with(NULL, dir, GANTRY_OK, message);
    check_file(model, 0, argv[2], GANTRY_SHA256_NOT_COMPUTED, zeros);
    check_file(model, 1, argv[4], GANTRY_SHA256_NOT_COMPUTED, zeros);
    gantry_model_free(model);

    model = load_with("require_sha256=1", dir, GANTRY_E_INTEGRITY, message);
    CHECK(model == NULL, "model_out untouched on failure");
    CHECK(strstr(message, argv[4]) && strstr(message, "require_sha256"), "%s", message);
    puts("sha256: ok");
    return 0;
}
