/* A live source from C: gantry_serve_start publishes a checkpoint on a socket, the ordinary
 * load calls read it as unix:///path, gantry_serve_publish makes a new version, and the
 * failures are statuses (GANTRY_E_LIVE for a socket taken or nobody serving).
 * Arguments: the first checkpoint, the second, a socket path. Both checkpoints hold "w"
 * (BF16 [32, 64]) and "b" (F32 [5]); the expected bytes are computed here from the formulas
 * the test wrote them with, not read through gantry. */
#include "check.h"

#include <string.h>
#include <unistd.h>

/* Byte i of tensor w of checkpoint `which` (1 or 2), as the test wrote it. */
static uint8_t w_byte(int which, uint32_t i) {
    return which == 1 ? (uint8_t)(i * 7 + 3) : (uint8_t)(i * 5 + 1);
}

/* Loads `url` into host memory and checks both tensors against checkpoint `which`. */
static void check_load(const gantry_loader *loader, const char *url, int which) {
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "load live");
    gantry_tensor t;
    expect(gantry_model_find(model, "w", &t), GANTRY_OK, "find w");
    CHECK(t.bytes == 4096 && t.ndim == 2 && t.shape[0] == 32 && t.shape[1] == 64, "w's shape");
    CHECK(strcmp(t.dtype, "BF16") == 0, "w's dtype %s", t.dtype);
    const uint8_t *w = (const uint8_t *)(uintptr_t)t.data;
    for (uint32_t i = 0; i < 4096; i++)
        CHECK(w[i] == w_byte(which, i), "w[%u] = %u, want %u (version %d)", i, w[i], w_byte(which, i), which);
    expect(gantry_model_find(model, "b", &t), GANTRY_OK, "find b");
    const uint8_t *b = (const uint8_t *)(uintptr_t)t.data;
    for (uint32_t i = 0; i < 20; i++) CHECK(b[i] == i + (which == 1 ? 0 : 100), "b[%u] = %u", i, b[i]);
    gantry_model_free(model);
}

static int into_target(void *user_data, const gantry_tensor *tensor, uint64_t *dest_out) {
    uint8_t *buffer = user_data;
    *dest_out = (uint64_t)(uintptr_t)(strcmp(tensor->name, "w") == 0 ? buffer : buffer + 4096);
    return 1;
}

int main(int argc, char **argv) {
    CHECK(argc == 4, "usage: serve FIRST SECOND SOCKET");
    const char *first = argv[1], *second = argv[2], *socket = argv[3];
    char url[4096];
    snprintf(url, sizeof url, "unix://%s", socket);
    CHECK(GANTRY_E_LIVE == 303, "GANTRY_E_LIVE is %d", (int)GANTRY_E_LIVE);
    CHECK(strcmp(gantry_status_name(GANTRY_E_LIVE), "GANTRY_E_LIVE") == 0, "status name");

    char message[512];
    gantry_loader *loader = NULL;
    expect(gantry_loader_new(NULL, &loader), GANTRY_OK, "loader");
    gantry_serve_options options;
    memset(&options, 0, sizeof options);
    options.socket = socket;
    options.loader = loader;
    gantry_server *server = NULL;
    expect(gantry_serve_start(first, NULL, &server), GANTRY_E_NULL_ARGUMENT, "NULL options");
    expect(gantry_serve_start(NULL, &options, &server), GANTRY_E_NULL_ARGUMENT, "NULL source");
    options.socket_mode = 01777;
    expect(gantry_serve_start(first, &options, &server), GANTRY_E_INVALID_ARGUMENT, "bad mode");
    options.socket_mode = 0;
    CHECK(server == NULL, "server_out written on failure");
    /* A device that is not one is refused, naming it, before anything is bound (NULL, as
     * here, and "" are host memory; a GPU is serve_device.c's). */
    const char *bad_devices[] = {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:99999999999", "cpu0"};
    for (size_t i = 0; i < sizeof bad_devices / sizeof *bad_devices; i++) {
        options.device = bad_devices[i];
        expect(gantry_serve_start(first, &options, &server), GANTRY_E_INVALID_ARGUMENT, bad_devices[i]);
        gantry_last_error_message(message, sizeof message);
        char quoted[64];
        snprintf(quoted, sizeof quoted, "'%s' is not a device", bad_devices[i]);
        CHECK(strstr(message, quoted) != NULL, "message: %s", message);
        CHECK(server == NULL, "server_out written on failure");
        CHECK(access(socket, F_OK) != 0, "a refused start bound %s", socket);
    }
    options.device = NULL;
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &(gantry_model *){NULL}), GANTRY_E_LIVE,
           "nobody serves yet");

    expect(gantry_serve_start(first, &options, &server), GANTRY_OK, "serve");
    char v1[GANTRY_SERVE_VERSION_MAX], v2[GANTRY_SERVE_VERSION_MAX], tiny[2] = "x";
    expect(gantry_serve_version(server, v1, sizeof v1), GANTRY_OK, "version");
    CHECK(strlen(v1) > 2, "version '%s'", v1);
    expect(gantry_serve_version(server, tiny, sizeof tiny), GANTRY_E_INVALID_ARGUMENT, "tiny buf");
    CHECK(strcmp(tiny, "x") == 0, "a failed call wrote its output");
    check_load(loader, url, 1);

    /* Into the caller's own memory, through gantry_loader_load_into. */
    uint8_t buffer[4096 + 20];
    memset(buffer, 0, sizeof buffer);
    gantry_report report;
    expect(gantry_loader_load_into(loader, url, GANTRY_DEVICE_HOST, into_target, NULL, buffer, &report),
           GANTRY_OK, "load_into live");
    for (uint32_t i = 0; i < 4096; i++) CHECK(buffer[i] == w_byte(1, i), "load_into w[%u]", i);
    CHECK(report.tensor_bytes == 4096 + 20, "report bytes %llu", (unsigned long long)report.tensor_bytes);

    /* A second server on the same socket is refused. */
    gantry_server *other = NULL;
    expect(gantry_serve_start(first, &options, &other), GANTRY_E_LIVE, "socket taken");
    CHECK(other == NULL, "server_out written on failure");

    /* A failed publication keeps the current version; a good one makes a new one. */
    expect(gantry_serve_publish(server, "/nonexistent/model.safetensors"), GANTRY_E_IO, "bad source");
    expect(gantry_serve_version(server, v2, sizeof v2), GANTRY_OK, "version");
    CHECK(strcmp(v1, v2) == 0, "a failed publication changed the version");
    expect(gantry_serve_publish(server, second), GANTRY_OK, "publish");
    expect(gantry_serve_version(server, v2, sizeof v2), GANTRY_OK, "version");
    CHECK(strcmp(v1, v2) != 0, "a new publication kept version %s", v1);
    check_load(loader, url, 2);
    expect(gantry_serve_publish(NULL, second), GANTRY_E_NULL_ARGUMENT, "NULL server");

    /* Tensors from memory, as a trainer publishes them: copied before the call returns. */
    static uint8_t w3[4096], b3[20];
    for (uint32_t i = 0; i < 4096; i++) w3[i] = (uint8_t)(i * 11 + 2);
    for (uint32_t i = 0; i < 20; i++) b3[i] = (uint8_t)(i + 50);
    const uint64_t w_shape[2] = {32, 64}, b_shape[1] = {5};
    gantry_tensor_in in[2] = {
        {.name = "w", .dtype = "BF16", .shape = w_shape, .ndim = 2, .data = w3, .len = sizeof w3},
        {.name = "b", .dtype = "F32", .shape = b_shape, .ndim = 1, .data = b3, .len = sizeof b3},
    };
    char v3[GANTRY_SERVE_VERSION_MAX];
    in[0].dtype = "BF17";
    expect(gantry_serve_publish_tensors(server, in, 2), GANTRY_E_INVALID_ARGUMENT, "bad dtype");
    in[0].dtype = "BF16";
    in[0].len = sizeof w3 - 2;
    expect(gantry_serve_publish_tensors(server, in, 2), GANTRY_E_DESTINATION, "short data");
    in[0].len = sizeof w3;
    expect(gantry_serve_publish_tensors(server, NULL, 2), GANTRY_E_NULL_ARGUMENT, "NULL tensors");
    expect(gantry_serve_version(server, v3, sizeof v3), GANTRY_OK, "version");
    CHECK(strcmp(v2, v3) == 0, "a refused publication changed the version");
    expect(gantry_serve_publish_tensors(server, in, 2), GANTRY_OK, "publish tensors");
    memset(w3, 0, sizeof w3); /* the server has its own copy */
    expect(gantry_serve_version(server, v3, sizeof v3), GANTRY_OK, "version");
    CHECK(strcmp(v2, v3) != 0, "publishing tensors kept version %s", v2);
    gantry_model *model = NULL;
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &model), GANTRY_OK, "load tensors");
    gantry_tensor t;
    expect(gantry_model_find(model, "w", &t), GANTRY_OK, "find w");
    CHECK(t.bytes == 4096 && t.ndim == 2 && strcmp(t.dtype, "BF16") == 0, "published w's table");
    for (uint32_t i = 0; i < 4096; i++)
        CHECK(((const uint8_t *)(uintptr_t)t.data)[i] == (uint8_t)(i * 11 + 2), "published w[%u]", i);
    expect(gantry_model_find(model, "b", &t), GANTRY_OK, "find b");
    for (uint32_t i = 0; i < 20; i++)
        CHECK(((const uint8_t *)(uintptr_t)t.data)[i] == i + 50, "published b[%u]", i);
    gantry_model_free(model);

    /* A cap on connections per user: out of range is refused; at 1, the lease this process
     * keeps on a source after a load is the user's one connection, and opening the source
     * again (which takes the new lease before the old one ends) is refused, saying why. */
    char capped_socket[4096], capped_url[4200];
    snprintf(capped_socket, sizeof capped_socket, "%s.capped", socket);
    snprintf(capped_url, sizeof capped_url, "unix://%s", capped_socket);
    gantry_serve_options capped = options;
    capped.socket = capped_socket;
    capped.max_connections_per_user = 1025;
    gantry_server *capped_server = NULL;
    expect(gantry_serve_start(first, &capped, &capped_server), GANTRY_E_INVALID_ARGUMENT, "cap 1025");
    gantry_last_error_message(message, sizeof message);
    CHECK(strstr(message, "max_connections_per_user 1025") != NULL, "message: %s", message);
    CHECK(capped_server == NULL, "server_out written on failure");
    capped.max_connections_per_user = 1;
    capped.device = ""; /* host memory, as NULL */
    expect(gantry_serve_start(first, &capped, &capped_server), GANTRY_OK, "serve capped");
    check_load(loader, capped_url, 1);
    expect(gantry_loader_load(loader, capped_url, GANTRY_DEVICE_HOST, &(gantry_model *){NULL}),
           GANTRY_E_LIVE, "a second connection");
    gantry_last_error_message(message, sizeof message);
    CHECK(strstr(message, "the server refused: too many connections from uid") != NULL &&
              strstr(message, "at most 1 per user") != NULL,
          "message: %s", message);
    gantry_serve_close(capped_server);
    CHECK(access(capped_socket, F_OK) != 0, "gantry_serve_close left %s", capped_socket);

    gantry_serve_close(server);
    gantry_serve_close(NULL);
    expect(gantry_loader_load(loader, url, GANTRY_DEVICE_HOST, &(gantry_model *){NULL}), GANTRY_E_LIVE,
           "after close");
    gantry_loader_free(loader);
    printf("serve: ok\n");
    return 0;
}
