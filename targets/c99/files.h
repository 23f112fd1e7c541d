/* Linux: data, state and checkpoints on files (files.c). */
#ifndef EDGEPROP_FILES_H
#define EDGEPROP_FILES_H
#include "edgeprop_fw.h"

void ep_fail(int code, const char *path, const char *problem);  /* "error: PATH: PROBLEM", exit(code) */
void ep_load_data(const char *path);                              /* data.bin -> ep_train_x ... */
/* ep_state and *p from `checkpoint` (returns 1) or, when there is none, from `initial` (0). */
int ep_load_state(const char *checkpoint, const char *initial, ep_progress *p);
void ep_checkpoint(const char *path, const ep_progress *p);      /* atomic: temp, fsync, rename */
long ep_peak_rss_kb(void);                                        /* VmHWM, -1 where unknown */

#endif
