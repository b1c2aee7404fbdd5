// C++17 smoke client of the gantry C ABI: RAII handles, lambdas as callbacks, and the same
// checks as smoke.c on the bytes and the error families. Usage: smoke GOOD CORRUPT
#include "gantry.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

static_assert(sizeof(gantry_tensor) == 72, "gantry_tensor layout");
static_assert(sizeof(gantry_config) == 40, "gantry_config layout");
static_assert(GANTRY_E_PANIC == 900 && GANTRY_E_UNAVAILABLE == 600, "status values are stable");

namespace {

struct LoaderFree {
    void operator()(gantry_loader *l) const { gantry_loader_free(l); }
};
struct ModelFree {
    void operator()(gantry_model *m) const { gantry_model_free(m); }
};
using Loader = std::unique_ptr<gantry_loader, LoaderFree>;
using Model = std::unique_ptr<gantry_model, ModelFree>;

void expect(gantry_status got, gantry_status want, const char *what) {
    if (got == want) return;
    std::string message(gantry_last_error_message(nullptr, 0) + 1, '\0');
    gantry_last_error_message(message.data(), message.size());
    throw std::runtime_error(std::string(what) + ": got " + gantry_status_name(got) + " (" + message.c_str() + ")");
}

std::vector<unsigned char> read_range(const char *path, uint64_t offset, uint64_t len) {
    std::ifstream f(path, std::ios::binary);
    std::vector<unsigned char> out(len);
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(reinterpret_cast<char *>(out.data()), static_cast<std::streamsize>(len));
    if (!f) throw std::runtime_error("short read");
    return out;
}

struct Destinations {
    std::vector<std::vector<unsigned char>> buffers;
    int ready = 0;
};

}  // namespace

int main(int argc, char **argv) try {
    if (argc != 3) throw std::runtime_error("usage: smoke GOOD CORRUPT");
    const char *good = argv[1];
    if (std::strcmp(gantry_version(), GANTRY_VERSION) != 0) throw std::runtime_error("version");

    gantry_loader *raw_loader = nullptr;
    expect(gantry_loader_new(nullptr, &raw_loader), GANTRY_OK, "loader_new (defaults)");
    Loader loader(raw_loader);

    gantry_model *raw_model = nullptr;
    expect(gantry_loader_load(loader.get(), good, GANTRY_DEVICE_HOST, &raw_model), GANTRY_OK, "load");
    Model model(raw_model);
    size_t count = 0;
    expect(gantry_model_tensor_count(model.get(), &count), GANTRY_OK, "count");
    std::vector<gantry_tensor> tensors(count);
    for (size_t i = 0; i < count; i++) {
        expect(gantry_model_tensor(model.get(), i, &tensors[i]), GANTRY_OK, "tensor");
        auto expected = read_range(good, tensors[i].file_offset, tensors[i].bytes);
        if (std::memcmp(reinterpret_cast<const void *>(static_cast<uintptr_t>(tensors[i].data)), expected.data(),
                        expected.size()) != 0)
            throw std::runtime_error(std::string("bytes differ: ") + tensors[i].name);
    }

    Destinations dest;
    dest.buffers.resize(count);
    auto target = [](void *user, const gantry_tensor *t, uint64_t *out) -> int32_t {
        auto &d = *static_cast<Destinations *>(user);
        d.buffers.at(t->index).resize(t->bytes);
        *out = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(d.buffers[t->index].data()));
        return 1;
    };
    auto ready = [](void *user, const gantry_tensor *) { static_cast<Destinations *>(user)->ready++; };
    gantry_report report{};
    expect(gantry_loader_load_into(loader.get(), good, GANTRY_DEVICE_HOST, target, ready, &dest, &report), GANTRY_OK,
           "load_into");
    if (dest.ready != static_cast<int>(count) || report.tensor_bytes == 0) throw std::runtime_error("ready count");
    for (const auto &t : tensors) {
        if (dest.buffers.at(t.index) != read_range(good, t.file_offset, t.bytes))
            throw std::runtime_error(std::string("caller buffer differs: ") + t.name);
    }

    gantry_model *out = nullptr;
    expect(gantry_loader_load(loader.get(), argv[2], GANTRY_DEVICE_HOST, &out), GANTRY_E_FORMAT, "corrupt header");
    expect(gantry_loader_load(loader.get(), "/nonexistent.safetensors", GANTRY_DEVICE_HOST, &out), GANTRY_E_IO,
           "missing");
    expect(gantry_loader_load(nullptr, good, GANTRY_DEVICE_HOST, &out), GANTRY_E_NULL_ARGUMENT, "NULL loader");
    gantry_status gpu = gantry_loader_load(loader.get(), good, 0, &out);
    if (gpu == GANTRY_OK) {
        Model m(out);
    } else if (gpu != GANTRY_E_UNAVAILABLE && gpu != GANTRY_E_CUDA) {
        throw std::runtime_error(std::string("GPU load: ") + gantry_status_name(gpu));
    }
    std::printf("GPU load: %s\nsmoke: ok\n", gantry_status_name(gpu));
    return 0;
} catch (const std::exception &e) {
    std::fprintf(stderr, "smoke.cpp: %s\n", e.what());
    return 1;
}
