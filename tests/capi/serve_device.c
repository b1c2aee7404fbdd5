/* gantry_serve_options.device from C: a server that keeps each version on a GPU too, and a
 * reader in another process that loads from that copy. The program opens the CUDA driver
 * itself with dlopen (no CUDA headers or libraries at build time), to tell whether the machine
 * has a GPU and to copy tensors back from one.
 *
 *   serve_device start FILE SOCKET   device "cuda:0": without a GPU a clean status and message
 *                                    (GANTRY_E_UNAVAILABLE or GANTRY_E_CUDA), nothing bound;
 *                                    with one, a server whose host load still works
 *   serve_device serve FILE SOCKET   (GPU) serves FILE keeping it on cuda:0, prints "READY",
 *                                    and serves until its standard input closes
 *   serve_device load URL            (GPU) loads URL onto GPU 0 and checks every byte
 *
 * FILE holds "w" (BF16 [32, 64], byte i = i * 7 + 3) and "b" (F32 [5], byte i = i): the
 * expected bytes are computed here, not read through gantry. Each mode prints
 * "serve_device MODE: ok", or "skipped: REASON" and exits 0 when it needs a GPU and the
 * machine has none (the test harness decides whether a skip is allowed). */
#include "check.h"
#include "cuda_driver.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Whether the machine has a GPU, as the CUDA driver says (none without the driver). */
static int has_gpu(void) {
    const char *why = "";
    return cuda_gpus(&why) > 0;
}

/* The expected byte i of tensor `name`. */
static uint8_t want(const char *name, uint32_t i) {
    return strcmp(name, "w") == 0 ? (uint8_t)(i * 7 + 3) : (uint8_t)i;
}

/* Tensor `name` of `model` is `bytes` bytes of the expected values, read from host memory
 * or, when `gpu`, copied back from GPU memory. */
static void check_tensor(const gantry_model *model, const char *name, uint64_t bytes, int gpu) {
    gantry_tensor t;
    expect(gantry_model_find(model, name, &t), GANTRY_OK, name);
    CHECK(t.bytes == bytes, "%s: %llu bytes", name, (unsigned long long)t.bytes);
    uint8_t got[4096];
    if (gpu) {
        CHECK(cu.memcpy_dtoh(got, t.data, t.bytes) == 0, "cuMemcpyDtoH of %s", name);
    } else {
        memcpy(got, (const void *)(uintptr_t)t.data, t.bytes);
    }
    for (uint32_t i = 0; i < t.bytes; i++)
        CHECK(got[i] == want(name, i), "%s[%u] = %u, want %u", name, i, got[i], want(name, i));
}

static void start(const char *file, const char *socket) {
    char url[4200], message[512];
    snprintf(url, sizeof url, "unix://%s", socket);
    int gpu = has_gpu();
    gantry_serve_options options;
    memset(&options, 0, sizeof options);
    options.socket = socket;
    options.device = "cuda:0";
    gantry_server *server = NULL;
    gantry_status status = gantry_serve_start(file, &options, &server);
    gantry_last_error_message(message, sizeof message);
    if (!gpu) {
        CHECK(status == GANTRY_E_UNAVAILABLE || status == GANTRY_E_CUDA,
              "cuda:0 without a GPU: %s (%s)", gantry_status_name(status), message);
        CHECK(strlen(message) > 0, "no message");
        CHECK(server == NULL, "server_out written on failure");
        CHECK(access(socket, F_OK) != 0, "a failed start left %s", socket);
        printf("without a GPU: %s: %s\n", gantry_status_name(status), message);
        printf("serve_device start: ok\n");
        return;
    }
    expect(status, GANTRY_OK, "serve on cuda:0");
    /* A host load reads the server's host memory, as from any server. */
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "host load");
    check_tensor(model, "w", 4096, 0);
    check_tensor(model, "b", 20, 0);
    gantry_model_free(model);
    gantry_loader_free(loader);
    gantry_serve_close(server);
    CHECK(access(socket, F_OK) != 0, "gantry_serve_close left %s", socket);
    printf("serve_device start: ok\n");
}

static void serve(const char *file, const char *socket) {
    if (!has_gpu()) {
        printf("skipped: no GPU (libcuda.so.1, cuInit or cuDeviceGetCount)\n");
        return;
    }
    gantry_serve_options options;
    memset(&options, 0, sizeof options);
    options.socket = socket;
    options.device = "cuda:0";
    gantry_server *server = NULL;
    expect(gantry_serve_start(file, &options, &server), GANTRY_OK, "serve on cuda:0");
    printf("READY\n");
    fflush(stdout);
    char buf[64];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {
    }
    gantry_serve_close(server);
    printf("serve_device serve: ok\n");
}

static void load(const char *url) {
    if (!has_gpu()) {
        printf("skipped: no GPU (libcuda.so.1, cuInit or cuDeviceGetCount)\n");
        return;
    }
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, url, 0, &model), GANTRY_OK, "load onto GPU 0");
    cuda_bind(0);
    check_tensor(model, "w", 4096, 1);
    check_tensor(model, "b", 20, 1);
    /* Copied from the server's device memory, not read from its host memory through the
     * staging ring (which a load from host memory to a GPU goes through). */
    gantry_report report;
    expect(gantry_model_report(model, &report), GANTRY_OK, "report");
    CHECK(report.tensor_bytes == 4096 + 20, "tensor bytes %llu", (unsigned long long)report.tensor_bytes);
    CHECK(report.staging_bytes == 0, "the load staged %llu bytes: it read the server's host memory",
          (unsigned long long)report.staging_bytes);
    gantry_model_free(model);
    gantry_loader_free(loader);
    printf("serve_device load: ok\n");
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "start") == 0) {
        start(argv[2], argv[3]);
    } else if (argc == 4 && strcmp(argv[1], "serve") == 0) {
        serve(argv[2], argv[3]);
    } else if (argc == 3 && strcmp(argv[1], "load") == 0) {
        load(argv[2]);
    } else {
        CHECK(0, "usage: serve_device start|serve FILE SOCKET, or serve_device load URL");
    }
    return 0;
}
