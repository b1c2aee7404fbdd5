/* The CUDA driver for the C clients that check tensors on a GPU: opened with dlopen (no CUDA
 * headers or libraries at build time), the few entry points they use, as cuda.h declares them
 * (CUresult is an int). */
#ifndef GANTRY_TESTS_CUDA_DRIVER_H
#define GANTRY_TESTS_CUDA_DRIVER_H

#include "check.h"

#include <dlfcn.h>
#include <stddef.h>

typedef int (*cu_init_fn)(unsigned);
typedef int (*cu_device_get_count_fn)(int *);
typedef int (*cu_device_get_fn)(int *, int);
typedef int (*cu_primary_ctx_retain_fn)(void **, int);
typedef int (*cu_ctx_set_current_fn)(void *);
typedef int (*cu_memcpy_dtoh_fn)(void *, unsigned long long, size_t);

static struct {
    cu_init_fn init;
    cu_device_get_count_fn device_get_count;
    cu_device_get_fn device_get;
    cu_primary_ctx_retain_fn primary_ctx_retain;
    cu_ctx_set_current_fn ctx_set_current;
    cu_memcpy_dtoh_fn memcpy_dtoh;
} cu;

/* `name` from library `lib`, or exits naming it. */
static inline void *symbol(void *lib, const char *name) {
    void *f = dlsym(lib, name);
    CHECK(f != NULL, "%s: %s", name, dlerror());
    return f;
}

/* Opens the driver and returns the number of GPUs it sees; 0 with `*why` saying why none. */
static inline int cuda_gpus(const char **why) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == NULL) {
        *why = "no CUDA driver (libcuda.so.1)";
        return 0;
    }
    *(void **)&cu.init = symbol(lib, "cuInit");
    *(void **)&cu.device_get_count = symbol(lib, "cuDeviceGetCount");
    *(void **)&cu.device_get = symbol(lib, "cuDeviceGet");
    *(void **)&cu.primary_ctx_retain = symbol(lib, "cuDevicePrimaryCtxRetain");
    *(void **)&cu.ctx_set_current = symbol(lib, "cuCtxSetCurrent");
    *(void **)&cu.memcpy_dtoh = symbol(lib, "cuMemcpyDtoH_v2");
    int count = 0;
    if (cu.init(0) != 0 || cu.device_get_count(&count) != 0 || count == 0) {
        *why = "no GPU (cuInit or cuDeviceGetCount failed, or no device)";
        return 0;
    }
    return count;
}

/* Makes GPU `ordinal`'s primary context (the one gantry and NCCL use) current here. */
static inline void cuda_bind(int ordinal) {
    int device = 0;
    void *context = NULL;
    CHECK(cu.device_get(&device, ordinal) == 0, "cuDeviceGet(%d)", ordinal);
    CHECK(cu.primary_ctx_retain(&context, device) == 0, "cuDevicePrimaryCtxRetain(%d)", ordinal);
    CHECK(cu.ctx_set_current(context) == 0, "cuCtxSetCurrent(%d)", ordinal);
}

#endif
