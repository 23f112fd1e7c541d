/* Linux: the data, the initial state and checkpoints are files (`deploy --target native`).
 *
 * data.bin, little-endian: "EPDATA1" and a zero byte, then uint32 n_train, n_test, n_in and
 * sample_bytes (1: uint8 samples, 4: float32), then train_x (n_train x n_in samples),
 * train_y (n_train uint8 labels), test_x, test_y.
 * state.bin: every unit's initial state, EP_STATE_FLOATS float32 (layout.json says where).
 * checkpoint.bin: "EPCKPT1" and a zero byte, uint64 run (EP_RUN: the bundle and the run's
 * settings), uint64 done, uint32 steps[EP_UNITS], float64 loss[EP_UNITS], then the state as
 * state.bin holds it. Written to checkpoint.bin.tmp, flushed to disk, renamed over the old one:
 * a crash leaves the old checkpoint or the new, never half of one. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "files.h"

const ep_sample (*ep_train_x)[EP_IN], (*ep_test_x)[EP_IN];
const uint8_t *ep_train_y, *ep_test_y;

static const char DATA_MAGIC[8] = "EPDATA1", CHECKPOINT_MAGIC[8] = "EPCKPT1";

void ep_fail(int code, const char *path, const char *problem) {
    fprintf(stderr, "error: %s: %s\n", path, problem);
    exit(code);
}

static void read_all(FILE *f, const char *path, void *to, size_t bytes, const char *what) {
    if (fread(to, 1, bytes, f) != bytes) ep_fail(2, path, what);
}

void ep_load_data(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) ep_fail(2, path, strerror(errno));
    char magic[8];
    uint32_t head[4];
    read_all(f, path, magic, 8, "not an edgeprop data file (too short)");
    if (memcmp(magic, DATA_MAGIC, 8) != 0) ep_fail(2, path, "not an edgeprop data file (no EPDATA1 header)");
    read_all(f, path, head, sizeof head, "not an edgeprop data file (too short)");
    if (head[0] != EP_NTRAIN || head[1] != EP_NTEST || head[2] != EP_IN || head[3] != sizeof(ep_sample)) {
        char why[200];
        snprintf(why, sizeof why, "holds %u/%u samples of %u x %u bytes; this build takes %u/%u of %u x %u "
                 "(run edgeprop deploy again for other data)", head[0], head[1], head[2], head[3], EP_NTRAIN,
                 EP_NTEST, EP_IN, (unsigned)sizeof(ep_sample));
        ep_fail(2, path, why);
    }
    size_t train = (size_t)EP_NTRAIN * EP_IN * sizeof(ep_sample), test = (size_t)EP_NTEST * EP_IN * sizeof(ep_sample);
    unsigned char *all = malloc(train + EP_NTRAIN + test + EP_NTEST);
    if (!all) ep_fail(1, path, "out of memory");
    read_all(f, path, all, train + EP_NTRAIN + test + EP_NTEST, "shorter than its header says");
    if (fgetc(f) != EOF) ep_fail(2, path, "longer than its header says");
    fclose(f);
    for (uint32_t i = 0; i < EP_NTRAIN + EP_NTEST; ++i) {
        uint8_t y = all[i < EP_NTRAIN ? train + i : train + EP_NTRAIN + test + (i - EP_NTRAIN)];
        if (y >= EP_CLASSES) ep_fail(2, path, "holds a label beyond the bundle's classes");
    }
    ep_train_x = (const ep_sample (*)[EP_IN])all;
    ep_train_y = all + train;
    ep_test_x = (const ep_sample (*)[EP_IN])(all + train + EP_NTRAIN);
    ep_test_y = all + train + EP_NTRAIN + test;
}

int ep_load_state(const char *checkpoint, const char *initial, ep_progress *p) {
    FILE *f = fopen(checkpoint, "rb");
    memset(p, 0, sizeof *p);
    if (!f) {
        if (errno != ENOENT) ep_fail(2, checkpoint, strerror(errno));
        f = fopen(initial, "rb");
        if (!f) ep_fail(2, initial, strerror(errno));
        read_all(f, initial, ep_state, sizeof ep_state, "shorter than the bundle's state");
        if (fgetc(f) != EOF) ep_fail(2, initial, "longer than the bundle's state");
        fclose(f);
        return 0;
    }
    char magic[8];
    uint64_t run;
    read_all(f, checkpoint, magic, 8, "not an edgeprop checkpoint (too short)");
    if (memcmp(magic, CHECKPOINT_MAGIC, 8) != 0) ep_fail(2, checkpoint, "not an edgeprop checkpoint (no EPCKPT1 header)");
    read_all(f, checkpoint, &run, 8, "truncated");
    if (run != EP_RUN) ep_fail(2, checkpoint, "was written by another bundle or other run settings");
    read_all(f, checkpoint, &p->done, 8, "truncated");
    read_all(f, checkpoint, p->steps, sizeof p->steps, "truncated");
    read_all(f, checkpoint, p->loss, sizeof p->loss, "truncated");
    read_all(f, checkpoint, ep_state, sizeof ep_state, "truncated");
    if (fgetc(f) != EOF || p->done > EP_TOTAL) ep_fail(2, checkpoint, "not a checkpoint of this build");
    fclose(f);
    return 1;
}

static void write_all(FILE *f, const char *path, const void *from, size_t bytes) {
    if (fwrite(from, 1, bytes, f) != bytes) ep_fail(1, path, strerror(errno));
}

void ep_checkpoint(const char *path, const ep_progress *p) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) ep_fail(1, tmp, strerror(errno));
    uint64_t run = EP_RUN;
    write_all(f, tmp, CHECKPOINT_MAGIC, 8);
    write_all(f, tmp, &run, 8);
    write_all(f, tmp, &p->done, 8);
    write_all(f, tmp, p->steps, sizeof p->steps);
    write_all(f, tmp, p->loss, sizeof p->loss);
    write_all(f, tmp, ep_state, sizeof ep_state);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) ep_fail(1, tmp, strerror(errno));
    if (rename(tmp, path) != 0) ep_fail(1, path, strerror(errno));
    int dir = open(".", O_RDONLY);  /* the rename itself, on disk */
    if (dir >= 0) {
        fsync(dir);
        close(dir);
    }
}

long ep_peak_rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) kb = strtol(line + 6, NULL, 10);
    if (f) fclose(f);
    return kb;
}
