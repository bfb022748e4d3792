// fiber.cpp: the context switch between emulated CUDA threads.
//
// A block's threads are fibers on one worker thread; they switch at every barrier and warp
// collective, so the switch is the emulator's hot path. glibc's swapcontext saves and restores the
// signal mask with a system call (~190 ns a switch, measured); this one saves only the registers
// the SysV x86-64 ABI makes callee-saved — rbx, rbp, r12–r15 — and costs a few nanoseconds. The
// MXCSR and x87 control words are callee-saved too, but no fiber changes them (kernels have no
// way to), so every fiber runs with the worker thread's, and saving them (ldmxcsr serialises)
// would only cost time.
#include "emu.h"

#if !defined(__x86_64__)
#error "the emulated GPU's context switch is written for x86-64"
#endif

// emu_switch(void** save /* rdi */, void* to /* rsi */)
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

extern "C" void emu_fiber_start();

namespace emu {

void* fiber_prepare(char* stack_top, void (*entry)(void*), void* arg) {
    // The frame emu_switch pops: r15, r14, r13 (arg), r12 (entry), rbx, rbp, and the return
    // address emu_fiber_start; a pad word below keeps rsp = top after the pops 16-byte aligned,
    // so the call in emu_fiber_start enters `entry` with the ABI's alignment.
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
    sp[0] = 0;                                             // pad (top − 64 ≡ 0 mod 16)
    sp[1] = 0;                                             // r15
    sp[2] = 0;                                             // r14
    sp[3] = reinterpret_cast<uint64_t>(arg);               // r13
    sp[4] = reinterpret_cast<uint64_t>(entry);             // r12
    sp[5] = 0;                                             // rbx
    sp[6] = 0;                                             // rbp
    sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_start);  // return address
    return sp + 1;
}

}  // namespace emu
