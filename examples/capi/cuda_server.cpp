// What a C++ inference server does with gantry: allocate its parameters with cudaMalloc, load
// a checkpoint into them through the callback API, and check every tensor bit for bit against
// its own read of the file; then the same through gantry-owned device memory. Prints GB/s.
//
//   nvcc -std=c++17 -O2 -I crates/gantry-capi/include examples/capi/cuda_server.cpp \
//        -L target/release -lgantry -o cuda_server
//   LD_LIBRARY_PATH=target/release ./cuda_server /path/to/checkpoint [device]
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "gantry.h"

namespace {

void check_cuda(cudaError_t e, const char *what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

void check(gantry_status s, const char *what) {
    if (s == GANTRY_OK) return;
    char message[1024];
    gantry_last_error_message(message, sizeof message);
    throw std::runtime_error(std::string(what) + ": " + gantry_status_name(s) + ": " + message);
}

struct Parameter {
    std::string name, file;
    uint64_t offset = 0, bytes = 0;
    void *device = nullptr;
};

struct Server {
    std::vector<Parameter> params;
    std::string checkpoint;
    size_t ready = 0;
};

// The server's own bookkeeping: one cudaMalloc per parameter, as its model code would do.
int32_t assign(void *user, const gantry_tensor *t, uint64_t *dest_out) {
    auto &s = *static_cast<Server *>(user);
    Parameter p{t->name, t->file, t->file_offset, t->bytes, nullptr};
    if (cudaMalloc(&p.device, t->bytes ? t->bytes : 1) != cudaSuccess) return 0;
    *dest_out = reinterpret_cast<uint64_t>(p.device);
    if (s.params.size() <= t->index) s.params.resize(t->index + 1);
    s.params[t->index] = p;
    return 1;
}

void landed(void *user, const gantry_tensor *) { static_cast<Server *>(user)->ready++; }

std::vector<unsigned char> file_bytes(const std::string &file, uint64_t offset, uint64_t len) {
    std::ifstream f(file, std::ios::binary);
    std::vector<unsigned char> out(len);
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(reinterpret_cast<char *>(out.data()), static_cast<std::streamsize>(len));
    if (!f) throw std::runtime_error("reading " + file);
    return out;
}

void verify(const void *device, uint64_t bytes, const std::string &file, uint64_t offset, const char *name) {
    std::vector<unsigned char> got(bytes);
    check_cuda(cudaMemcpy(got.data(), device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
    if (got != file_bytes(file, offset, bytes)) throw std::runtime_error(std::string("mismatch in ") + name);
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char **argv) try {
    if (argc < 2) throw std::runtime_error("usage: cuda_server CHECKPOINT [device]");
    const int device = argc > 2 ? std::atoi(argv[2]) : 0;
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaFree(nullptr), "CUDA init");  // the runtime's primary context, which gantry shares

    gantry_loader *loader = nullptr;
    check(gantry_loader_new(nullptr, &loader), "gantry_loader_new");

    // 1. Into the server's own cudaMalloc'd parameters.
    Server server;
    gantry_report report{};
    auto start = std::chrono::steady_clock::now();
    check(gantry_loader_load_into(loader, argv[1], device, assign, landed, &server, &report), "load_into");
    double into_s = seconds_since(start);
    if (server.ready != server.params.size()) throw std::runtime_error("ready callbacks != tensors");
    for (const Parameter &p : server.params) verify(p.device, p.bytes, p.file, p.offset, p.name.c_str());
    const size_t count = server.params.size();

    // 2. Into gantry-owned device memory.
    gantry_model *model = nullptr;
    start = std::chrono::steady_clock::now();
    check(gantry_loader_load(loader, argv[1], device, &model), "gantry_loader_load");
    double owned_s = seconds_since(start);
    gantry_report owned{};
    check(gantry_model_report(model, &owned), "report");
    size_t owned_count = 0;
    check(gantry_model_tensor_count(model, &owned_count), "count");
    for (size_t i = 0; i < owned_count; i++) {
        gantry_tensor t;
        check(gantry_model_tensor(model, i, &t), "tensor");
        verify(reinterpret_cast<const void *>(t.data), t.bytes, t.file, t.file_offset, t.name);
    }
    std::printf("server-owned (cudaMalloc + callbacks): %zu tensors, %.2f GB in %.3f s: %.2f GB/s (load %.2f GB/s)\n",
                count, report.tensor_bytes / 1e9, into_s, report.tensor_bytes / into_s / 1e9,
                report.tensor_bytes / report.seconds / 1e9);
    std::printf("gantry-owned: %.2f GB in %.3f s: %.2f GB/s (load %.2f GB/s)\n", owned.tensor_bytes / 1e9, owned_s,
                owned.tensor_bytes / owned_s / 1e9, owned.tensor_bytes / owned.seconds / 1e9);
    std::printf("checked %zu + %zu tensors bit for bit against the files\n", count, owned_count);
    for (auto &p : server.params) cudaFree(p.device);
    gantry_model_free(model);
    gantry_loader_free(loader);
    return 0;
} catch (const std::exception &e) {
    std::fprintf(stderr, "cuda_server: %s\n", e.what());
    return 1;
}
