/* Reset and vector table for a Cortex-M (M4F/M7 with an FPU): copy .data from flash, zero
 * .bss, enable the FPU, run main, exit through semihosting with its return value (qemu
 * returns it as its exit status). A fault exits with 3 instead of hanging the emulator. */
#include <stdint.h>
#include <string.h>

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[], __stack_top[];
int main(void);
void ep_exit(int code);
void ep_paint_stack(void);

void ep_reset(void) {
    memcpy(__data_start, __data_load, (size_t)((char *)__data_end - (char *)__data_start));
    memset(__bss_start, 0, (size_t)((char *)__bss_end - (char *)__bss_start));
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;  /* CPACR: full access to CP10 and CP11 (the FPU) */
    __asm__ volatile("dsb\n isb");
    ep_paint_stack();
    ep_exit(main());
}

void ep_fault(void) { ep_exit(3); }

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))__stack_top, ep_reset, ep_fault, ep_fault, ep_fault, ep_fault, ep_fault,
};
