/* Minimal Cortex-M4 start-up: vector table, reset handler, memset/memcpy.
 *
 * A real part jumps to reset_handler after power-on; it copies .data from flash to
 * SRAM, zeroes .bss and calls app_main(). The emulator does the copying itself and
 * calls functions directly; it returns into mcu_halt(), where emulation stops. */
#include <stddef.h>
#include <stdint.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

void app_main(void);
void reset_handler(void);
void mcu_halt(void);

__attribute__((used, section(".vectors")))
const void *const vector_table[4] = {
    &_estack,       /* initial stack pointer */
    reset_handler,  /* reset */
    mcu_halt,       /* NMI */
    mcu_halt,       /* hard fault */
};

__attribute__((noinline)) void mcu_halt(void) {
    for (;;) {
    }
}

void reset_handler(void) {
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
    for (uint32_t *dst = &_sbss; dst < &_ebss;) *dst++ = 0;
    app_main();
    mcu_halt();
}

/* The compiler may turn copy and zero-fill loops into calls to these two. */
void *memset(void *dst, int value, size_t n) {
    uint8_t *d = dst;
    while (n--) *d++ = (uint8_t)value;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n) {
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n--) *d++ = *s++;
    return dst;
}
