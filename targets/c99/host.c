/* The platform on a desktop (make host): stdio, no tick counter. Lets the very driver and
 * graphs that run on the microcontroller be built and checked natively with gcc first. */
#include <stdio.h>

#include "edgeprop_fw.h"

void ep_write(const char *text) { fputs(text, stdout); }

void ep_save(const char *path, const void *data, uint32_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
    }
}

const uint32_t ep_tick_mask = 0;
uint32_t ep_ticks(void) { return 0; }
long ep_stack_used(void) { return -1; }
uint32_t ep_calibrate(uint32_t loops) { (void)loops; return 0; }
