/* The platform on a Cortex-M: Arm semihosting for output and files (a debugger, or
 * qemu-system-arm -semihosting, serves it), SysTick for ticks. No newlib stdio: it would
 * malloc its buffers; these calls need none. */
#include <stdint.h>
#include <string.h>

#include "edgeprop_fw.h"

enum { SYS_OPEN = 0x01, SYS_CLOSE = 0x02, SYS_WRITE = 0x05, SYS_EXIT_EXTENDED = 0x20 };

static uint32_t semihost(uint32_t op, const void *args) {
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = args;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static uint32_t open_file(const char *path, uint32_t mode) {
    uint32_t args[3] = {(uint32_t)path, mode, strlen(path)};
    return semihost(SYS_OPEN, args);
}

static void write_all(uint32_t handle, const void *data, uint32_t bytes) {
    uint32_t args[3] = {handle, (uint32_t)data, bytes};
    semihost(SYS_WRITE, args);
}

void ep_write(const char *text) {
    static uint32_t console;  /* ":tt" is the host's console; mode 4 is "w" */
    if (!console) console = open_file(":tt", 4);
    write_all(console, text, strlen(text));
}

void ep_save(const char *path, const void *data, uint32_t bytes) {
    uint32_t handle = open_file(path, 5);  /* "wb" */
    if (handle == (uint32_t)-1) {
        ep_write("ep error cannot open a file on the host\n");
        return;
    }
    write_all(handle, data, bytes);
    semihost(SYS_CLOSE, &handle);
}

void ep_exit(int code) {
    uint32_t args[2] = {0x20026, (uint32_t)code};  /* ADP_Stopped_ApplicationExit, with the code */
    semihost(SYS_EXIT_EXTENDED, args);
    for (;;) {
    }
}

/* SysTick, clocked by the core: 24 bits, counting down. */
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
const uint32_t ep_tick_mask = 0xFFFFFFu;

uint32_t ep_ticks(void) {
    if (!(SYST_CSR & 1u)) {
        SYST_RVR = 0xFFFFFFu;
        SYST_CVR = 0;
        SYST_CSR = 5u;  /* enabled, processor clock, no interrupt */
    }
    return SYST_CVR;
}

uint32_t ep_calibrate(uint32_t loops) {
    uint32_t start = ep_ticks();
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(loops) : : "cc");
    return (start - ep_ticks()) & ep_tick_mask;
}

extern uint32_t __stack_bottom[], __stack_top[];
#define STACK_PAINT 0x5AFEC0DEu

/* Called first thing at reset (startup.c): paint the stack below the caller's frame. */
void ep_paint_stack(void) {
    uint32_t *p = __stack_bottom, *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    while (p < sp - 16) *p++ = STACK_PAINT;
}

long ep_stack_used(void) {
    uint32_t *p = __stack_bottom;
    while (p < __stack_top && *p == STACK_PAINT) ++p;
    return (long)((char *)__stack_top - (char *)p);
}
