// memory.cpp: device memory of the emulated GPU — host mappings laid out so that a kernel that
// strays past an allocation is caught, never silently reading a neighbour's bytes.
//
// Each allocation is its own mapping:  [guard page][head slack][data][tail slack][guard page]
// The data ends on the last page of the mapping (rounded up to 256 bytes, cuMemAlloc's
// alignment guarantee), so reading or writing just past a 256-byte multiple faults on the guard
// page at once; the slack on both sides holds a canary (0xFF bytes: NaN as f32 and bf16), so a
// read there poisons the result and a write there is found by the canary check after the launch.
// The mapping is MAP_NORESERVE: a 24 GB emulated card costs only the pages written.
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>

#include "emu.h"

namespace emu {

namespace {

constexpr unsigned char CANARY = 0xFF;

std::mutex mu;
std::map<uintptr_t, Allocation> live;  // by base
uint64_t used = 0;

size_t page() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// What the cap counts: the bytes asked for, in the 256-byte granules the allocator hands out.
uint64_t charge(size_t bytes) { return round_up(bytes == 0 ? 1 : bytes, 256); }

}  // namespace

int mem_alloc(size_t bytes, uintptr_t* out) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;  // cuMemAlloc refuses a zero size
    const size_t pg = page();
    const size_t user = round_up(bytes, 256);
    if (user < bytes) return CUDA_ERROR_OUT_OF_MEMORY;
    {
        std::lock_guard<std::mutex> g(mu);
        if (used + charge(bytes) > settings().memory_bytes) return CUDA_ERROR_OUT_OF_MEMORY;
        used += charge(bytes);
    }
    const size_t body = round_up(user, pg);
    const size_t map_bytes = body + 2 * pg;
    void* m = mmap(nullptr, map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        std::lock_guard<std::mutex> g(mu);
        used -= charge(bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    const uintptr_t map = reinterpret_cast<uintptr_t>(m);
    if (mprotect(reinterpret_cast<void*>(map + pg), body, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, map_bytes);
        std::lock_guard<std::mutex> g(mu);
        used -= charge(bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    Allocation a;
    a.map = map;
    a.map_bytes = map_bytes;
    a.user_end = map + pg + body;
    a.base = a.user_end - user;
    a.bytes = bytes;
    // Canaries: the head slack and the tail slack (between the asked-for end and the 256 round).
    // Fresh pages are zero, as fresh device memory is not: the data itself is left to the
    // caller (cuMemAlloc makes no promise about it).
    memset(reinterpret_cast<void*>(map + pg), CANARY, a.base - (map + pg));
    memset(reinterpret_cast<void*>(a.base + bytes), CANARY, user - bytes);
    {
        std::lock_guard<std::mutex> g(mu);
        live[a.base] = a;
    }
    *out = a.base;
    return CUDA_SUCCESS;
}

int mem_free(uintptr_t base) {
    Allocation a;
    {
        std::lock_guard<std::mutex> g(mu);
        auto it = live.find(base);
        if (it == live.end()) return CUDA_ERROR_INVALID_VALUE;
        a = it->second;
        live.erase(it);
        used -= charge(a.bytes);
    }
    munmap(reinterpret_cast<void*>(a.map), a.map_bytes);
    return CUDA_SUCCESS;
}

bool mem_find(uintptr_t p, size_t bytes, Allocation* out) {
    std::lock_guard<std::mutex> g(mu);
    auto it = live.upper_bound(p);
    if (it == live.begin()) return false;
    --it;
    const Allocation& a = it->second;
    if (p < a.base || p + bytes > a.base + a.bytes || p + bytes < p) return false;
    if (out) *out = a;
    return true;
}

bool mem_guard_hit(uintptr_t addr, Allocation* out) {
    std::lock_guard<std::mutex> g(mu);
    for (const auto& [base, a] : live) {
        if (addr >= a.map && addr < a.map + a.map_bytes) {
            *out = a;
            return true;
        }
    }
    return false;
}

void mem_info(uint64_t* free_bytes, uint64_t* total) {
    std::lock_guard<std::mutex> g(mu);
    *total = settings().memory_bytes;
    *free_bytes = used >= *total ? 0 : *total - used;
}

uint64_t mem_used() {
    std::lock_guard<std::mutex> g(mu);
    return used;
}

bool mem_check_canaries(Allocation* bad, size_t* offset) {
    std::lock_guard<std::mutex> g(mu);
    const size_t pg = page();
    for (const auto& [base, a] : live) {
        const unsigned char* head = reinterpret_cast<const unsigned char*>(a.map + pg);
        for (const unsigned char* p = head; p < reinterpret_cast<const unsigned char*>(a.base); ++p)
            if (*p != CANARY) {
                *bad = a;
                *offset = (size_t)(reinterpret_cast<const unsigned char*>(a.base) - p);
                return true;  // before the start: offset counts bytes before base
            }
        const unsigned char* tail = reinterpret_cast<const unsigned char*>(a.base + a.bytes);
        for (const unsigned char* p = tail; p < reinterpret_cast<const unsigned char*>(a.user_end);
             ++p)
            if (*p != CANARY) {
                *bad = a;
                *offset = a.bytes + (size_t)(p - tail);
                return true;
            }
    }
    return false;
}

void mem_snapshot(Snapshot* s) {
    std::lock_guard<std::mutex> g(mu);
    s->data.clear();
    for (const auto& [base, a] : live) {
        const unsigned char* p = reinterpret_cast<const unsigned char*>(a.base);
        s->data.emplace_back(a, std::vector<unsigned char>(p, p + a.bytes));
    }
}

void mem_restore(const Snapshot& s) {
    std::lock_guard<std::mutex> g(mu);
    for (const auto& [a, bytes] : s.data)
        if (live.count(a.base)) memcpy(reinterpret_cast<void*>(a.base), bytes.data(), a.bytes);
}

bool mem_compare(const Snapshot& s, Allocation* where, size_t* offset) {
    std::lock_guard<std::mutex> g(mu);
    for (const auto& [a, bytes] : s.data) {
        if (!live.count(a.base)) continue;
        const unsigned char* p = reinterpret_cast<const unsigned char*>(a.base);
        if (memcmp(p, bytes.data(), a.bytes) == 0) continue;
        for (size_t i = 0; i < a.bytes; ++i)
            if (p[i] != bytes[i]) {
                *where = a;
                *offset = i;
                return true;
            }
    }
    return false;
}

}  // namespace emu
