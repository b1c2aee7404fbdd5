#!/usr/bin/env python3
"""What it costs a second process to map another's GPU memory, by the two ways the driver
offers: legacy CUDA IPC (cuIpcGetMemHandle / cuIpcOpenMemHandle over cuMemAlloc memory) and
virtual memory management (cuMemCreate with a POSIX file descriptor handle, exported with
cuMemExportToShareableHandle, passed over a Unix socket, imported and mapped with
cuMemImportFromShareableHandle, cuMemAddressReserve, cuMemMap, cuMemSetAccess).

Usage: ipc_map.py [--gib-each 4] [--count 4] [--sizes B,B,...] [--host-map-gib G] [--device 0] [--rounds 3]

--sizes gives each buffer's bytes instead (e.g. a checkpoint's data sections, which are not
multiples of the allocation granularity); --host-map-gib maps that much shared memory (a
memfd, untouched) into the reader before it maps anything, as a live reader holds the
publication's memfds; --server-pin-gib page-locks that much shared memory in the server
(cuMemHostRegister), as `gantry serve` registers its memfds.

The server (parent) allocates COUNT buffers of GIB_EACH GiB both ways and hands them over; the
reader (a child forked before either process touches CUDA) maps them, times each step per
buffer, copies every buffer device-to-device into its own memory (the rate a live load's copy
runs at once mapped), unmaps, and repeats ROUNDS times. Prints one JSON object per round and
a summary line. Needs only the CUDA driver (libcuda.so.1) and Python 3.
"""
import argparse
import ctypes as C
import json
import os
import socket
import struct
import sys
import time

CU = None


def check(rc, what):
    if rc != 0:
        name = C.c_char_p()
        CU.cuGetErrorName(rc, C.byref(name))
        raise RuntimeError(f"{what}: {rc} {name.value.decode() if name.value else ''}")


class Location(C.Structure):
    _fields_ = [("type", C.c_int), ("id", C.c_int)]


class AllocFlags(C.Structure):
    _fields_ = [("compressionType", C.c_ubyte), ("gpuDirectRDMACapable", C.c_ubyte),
                ("usage", C.c_ushort), ("reserved", C.c_ubyte * 4)]


class AllocProp(C.Structure):
    _fields_ = [("type", C.c_int), ("requestedHandleTypes", C.c_int), ("location", Location),
                ("win32HandleMetaData", C.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(C.Structure):
    _fields_ = [("location", Location), ("flags", C.c_int)]


class IpcHandle(C.Structure):
    _fields_ = [("reserved", C.c_char * 64)]  # passed by value, as the driver takes it


PINNED, POSIX_FD, LOCATION_DEVICE, READWRITE = 1, 1, 1, 3


def init(device):
    global CU
    CU = C.CDLL("libcuda.so.1")
    t = time.perf_counter()
    check(CU.cuInit(0), "cuInit")
    dev = C.c_int()
    check(CU.cuDeviceGet(C.byref(dev), device), "cuDeviceGet")
    ctx = C.c_void_p()
    check(CU.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(CU.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    free = C.c_size_t()
    total = C.c_size_t()
    check(CU.cuMemGetInfo_v2(C.byref(free), C.byref(total)), "cuMemGetInfo")
    return time.perf_counter() - t


def prop(device):
    p = AllocProp()
    p.type, p.requestedHandleTypes = PINNED, POSIX_FD
    p.location = Location(LOCATION_DEVICE, device)
    return p


def granularity(p):
    g = C.c_size_t()
    check(CU.cuMemGetAllocationGranularity(C.byref(g), C.byref(p), 1), "granularity")  # 1: recommended
    return g.value


def server(sock, args):
    init(args.device)
    if args.server_pin_gib:
        import mmap
        n = args.server_pin_gib << 30
        fd = os.memfd_create("server-pin")
        os.ftruncate(fd, n)
        pinned = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        base = C.addressof(C.c_char.from_buffer(pinned))
        check(CU.cuMemHostRegister_v2(C.c_void_p(base), C.c_size_t(n), 1), "cuMemHostRegister")
    handles, fds, keep = [], [], []
    for i, size in enumerate(args.sizes):
        ptr = C.c_uint64()
        check(CU.cuMemAlloc_v2(C.byref(ptr), C.c_size_t(size)), "cuMemAlloc")
        check(CU.cuMemsetD8_v2(ptr, i + 1, C.c_size_t(size)), "cuMemsetD8")
        h = IpcHandle()
        check(CU.cuIpcGetMemHandle(C.byref(h), ptr), "cuIpcGetMemHandle")
        handles.append(bytes(h))
        keep.append(ptr)
    p = prop(args.device)
    g = granularity(p)
    vsizes = [(size + g - 1) // g * g for size in args.sizes]
    for vsize in vsizes:
        h = C.c_uint64()
        check(CU.cuMemCreate(C.byref(h), C.c_size_t(vsize), C.byref(p), C.c_ulonglong(0)), "cuMemCreate")
        fd = C.c_int()
        check(CU.cuMemExportToShareableHandle(C.byref(fd), h, POSIX_FD, C.c_ulonglong(0)), "export")
        fds.append(fd.value)
    CU.cuCtxSynchronize()
    msg = json.dumps({"sizes": args.sizes, "vsizes": vsizes, "granularity": g,
                      "ipc": [x.hex() for x in handles]}).encode()
    socket.send_fds(sock, [struct.pack("!I", len(msg)) + msg], fds)
    sock.recv(1)  # the reader is done
    for fd in fds:
        os.close(fd)


def reader(sock, args):
    if args.host_map_gib:
        import mmap
        fd = os.memfd_create("host-map")
        os.ftruncate(fd, args.host_map_gib << 30)
        host_map = mmap.mmap(fd, args.host_map_gib << 30, mmap.MAP_SHARED, mmap.PROT_READ)  # noqa: F841 - held
    cuda_s = init(args.device)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, len(args.sizes))
    info = json.loads(data[4:4 + struct.unpack("!I", data[:4])[0]])
    sizes, vsizes = info["sizes"], info["vsizes"]
    dest = C.c_uint64()
    check(CU.cuMemAlloc_v2(C.byref(dest), C.c_size_t(max(sizes))), "cuMemAlloc (reader)")
    results = []
    for r in range(args.rounds):
        row = {"round": r + 1, "cuda_start_s": round(cuda_s, 4) if r == 0 else None}
        # Legacy IPC.
        opens, ptrs = [], []
        t0 = time.perf_counter()
        for hx in info["ipc"]:
            h = IpcHandle.from_buffer_copy(bytes.fromhex(hx))
            ptr = C.c_uint64()
            t = time.perf_counter()
            check(CU.cuIpcOpenMemHandle_v2(C.byref(ptr), h, 1), "cuIpcOpenMemHandle")
            opens.append(time.perf_counter() - t)
            ptrs.append(ptr)
        row["ipc_open_ms"] = [round(x * 1e3, 2) for x in opens]
        row["ipc_open_total_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        t = time.perf_counter()
        for ptr, size in zip(ptrs, sizes):
            check(CU.cuMemcpyDtoD_v2(dest, ptr, C.c_size_t(size)), "cuMemcpyDtoD (ipc)")
        check(CU.cuCtxSynchronize(), "sync")
        copy = time.perf_counter() - t
        row["ipc_copy_gb_s"] = round(sum(sizes) / copy / 1e9, 1)
        t = time.perf_counter()
        for ptr in ptrs:
            check(CU.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")
        row["ipc_close_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        # VMM.
        steps = {"import": 0.0, "reserve": 0.0, "map": 0.0, "access": 0.0}
        mapped = []
        t0 = time.perf_counter()
        for fd, vsize in zip(fds, vsizes):
            h = C.c_uint64()
            t = time.perf_counter()
            check(CU.cuMemImportFromShareableHandle(C.byref(h), C.c_void_p(fd), POSIX_FD), "import")
            steps["import"] += time.perf_counter() - t
            va = C.c_uint64()
            t = time.perf_counter()
            check(CU.cuMemAddressReserve(C.byref(va), C.c_size_t(vsize), C.c_size_t(0), C.c_uint64(0),
                                         C.c_ulonglong(0)), "reserve")
            steps["reserve"] += time.perf_counter() - t
            t = time.perf_counter()
            check(CU.cuMemMap(va, C.c_size_t(vsize), C.c_size_t(0), h, C.c_ulonglong(0)), "map")
            steps["map"] += time.perf_counter() - t
            d = AccessDesc(Location(LOCATION_DEVICE, args.device), READWRITE)
            t = time.perf_counter()
            check(CU.cuMemSetAccess(va, C.c_size_t(vsize), C.byref(d), C.c_size_t(1)), "access")
            steps["access"] += time.perf_counter() - t
            mapped.append((va, h, vsize))
        row["vmm_total_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        row["vmm_steps_ms"] = {k: round(v * 1e3, 2) for k, v in steps.items()}
        t = time.perf_counter()
        for (va, _, _), size in zip(mapped, sizes):
            check(CU.cuMemcpyDtoD_v2(dest, va, C.c_size_t(size)), "cuMemcpyDtoD (vmm)")
        check(CU.cuCtxSynchronize(), "sync")
        row["vmm_copy_gb_s"] = round(sum(sizes) / (time.perf_counter() - t) / 1e9, 1)
        for va, h, vsize in mapped:
            check(CU.cuMemUnmap(va, C.c_size_t(vsize)), "unmap")
            check(CU.cuMemAddressFree(va, C.c_size_t(vsize)), "address free")
            check(CU.cuMemRelease(h), "release")
        print(json.dumps(row), flush=True)
        results.append(row)
    sock.send(b"x")
    first = results[0]
    print(f"summary: {len(sizes)} buffers, {sum(sizes)} bytes, host map {args.host_map_gib} GiB: first round ipc {first['ipc_open_total_ms']} ms, "
          f"vmm {first['vmm_total_ms']} ms; later rounds ipc "
          f"{[r['ipc_open_total_ms'] for r in results[1:]]} vmm {[r['vmm_total_ms'] for r in results[1:]]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib-each", type=int, default=4)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="")
    ap.add_argument("--host-map-gib", type=int, default=0)
    ap.add_argument("--server-pin-gib", type=int, default=0)
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [args.gib_each << 30] * args.count
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            reader(b, args)
        except Exception as e:  # noqa: BLE001 - reported, then the child exits non-zero
            print(f"reader: {e}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    b.close()
    server(a, args)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
