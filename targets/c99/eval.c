/* ./eval: test accuracy of checkpoint.bin (of state.bin, untrained, when there is none) on
 * data.bin's test split, with the bundle's inference chain and the sampled chain. */
#include <stdio.h>

#include "files.h"

int main(int argc, char **argv) {
    if (argc > 1) {
        fprintf(stderr, "error: ./eval takes no arguments, got '%s'\n", argv[1]);
        return 2;
    }
    ep_load_data("data.bin");
    ep_progress progress;
    if (!ep_load_state("checkpoint.bin", "state.bin", &progress)) printf("ep untrained (no checkpoint.bin)\n");
    ep_say("trained", (int64_t)progress.done);
    ep_report_accuracy();
    return 0;
}
