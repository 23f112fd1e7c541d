/* ./train [--steps N] [--checkpoint-every N]: trains the bundle on data.bin with no Python,
 * resuming from checkpoint.bin when there is one; writes checkpoint.bin atomically every
 * --checkpoint-every work items (default: at most every 60 s) and at the end.
 * --steps N: stop once N work items of the whole run are done (a later ./train resumes). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "files.h"

#define CHECKPOINT_SECONDS 60.0

static double seconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t count(const char *flag, const char *text) {
    char *end;
    unsigned long long n = text ? strtoull(text, &end, 10) : 0;
    if (!text || *end || n == 0 || text[0] == '-') {
        fprintf(stderr, "error: %s takes a positive whole number, got '%s'\n", flag, text ? text : "");
        exit(2);
    }
    return n;
}

int main(int argc, char **argv) {
    uint64_t stop = EP_TOTAL, every = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--steps") == 0) stop = count("--steps", argv[++i]);
        else if (strcmp(argv[i], "--checkpoint-every") == 0) every = count("--checkpoint-every", argv[++i]);
        else {
            fprintf(stderr, "error: unknown argument '%s' (usage: ./train [--steps N] [--checkpoint-every N])\n", argv[i]);
            return 2;
        }
    }
    if (stop > EP_TOTAL) stop = EP_TOTAL;
    ep_load_data("data.bin");
    ep_progress progress;
    int resumed = ep_load_state("checkpoint.bin", "state.bin", &progress);
    printf("ep start units %d train %d test %d epochs %d order %s %s %llu of %llu\n", EP_UNITS, EP_NTRAIN, EP_NTEST,
           EP_EPOCHS, EP_INTERLEAVED ? "interleaved" : "block-sequential", resumed ? "resumed at" : "from",
           (unsigned long long)progress.done, (unsigned long long)EP_TOTAL);
    uint64_t first = progress.done;
    double wall = seconds(CLOCK_MONOTONIC), cpu = seconds(CLOCK_PROCESS_CPUTIME_ID), saved = wall;
    while (progress.done < stop) {
        uint64_t to = progress.done + (every ? every : EP_UNITS);
        if (to > stop) to = stop;
        if (ep_train(&progress, to) != 0) {
            fprintf(stderr, "error: training diverged (a loss is not finite); checkpoint.bin is the last good state\n");
            return 1;
        }
        if (every || seconds(CLOCK_MONOTONIC) - saved >= CHECKPOINT_SECONDS || progress.done == stop) {
            ep_checkpoint("checkpoint.bin", &progress);
            saved = seconds(CLOCK_MONOTONIC);
        }
    }
    wall = seconds(CLOCK_MONOTONIC) - wall, cpu = seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu;
    /* training throughput: samples (a batch through every unit) per wall and per CPU second */
    double samples = (double)(progress.done - first) / EP_UNITS * EP_BATCH;
    printf("ep samples-per-s %.1f %.1f\n", wall > 0 ? samples / wall : 0.0, cpu > 0 ? samples / cpu : 0.0);
    ep_say("peak-rss-kb", ep_peak_rss_kb());
    if (progress.done == EP_TOTAL) ep_say("done", (int64_t)progress.done);
    return 0;
}
