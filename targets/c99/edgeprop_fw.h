/* The interface between edgeprop's driver (driver.c, the same for every bundle), the model that
 * `edgeprop deploy --target c99|native` generates (model.h, model.c, the graphs/ folder) and the
 * platform (semihost.c on an emulated or real Cortex-M, host.c on a desktop or Linux device;
 * files.c, train.c and eval.c on Linux). */
#ifndef EDGEPROP_FW_H
#define EDGEPROP_FW_H

#include <stdint.h>

#include "model.h"

/* The driver's buffers; a graph's inputs and outputs name them in the manifest's order.
 * A step graph writes next.param / next.opt.* over param / opt.* (checked at generation). */
enum { EP_STATE0 = 0, EP_X = EP_STATE0 + 4, EP_Z, EP_TARGET, EP_MASK, EP_LOSS_SCALE, EP_LR, EP_STEP, EP_LOSS,
       EP_OUT, EP_BUFFERS };

typedef struct {
    void (*run)(void *const *io);  /* the generated graph, called with its buffers in order */
    const uint8_t *io;              /* which buffer each input and output is */
    uint8_t n_io;
} ep_graph;

typedef struct {
    const char *name;
    uint8_t is_head;
    uint32_t n_params;
    float *state;            /* in flash: EP_SLOTS x n_params floats, param first */
    float lr;                /* the step graph's lr input */
    float loss_scale;        /* a block's loss weight w_t (the head has none) */
    double z_signal, z_noise;  /* z = z_signal * u_y + z_noise * eps: sqrt(ab), sqrt(1 - ab) */
    float infer_a, infer_b;  /* inference: z_t = a * u_hat + b * z + tau * sqrt_c * eps (tau: EP_TEMPERATURE) */
    double infer_sqrt_c;
    uint32_t target_dim;     /* u_y (a block) or the one-hot label (the head) */
    uint32_t out_dim;        /* u_hat or logits */
    ep_graph step, infer;
} ep_unit;

extern const ep_unit ep_units[EP_UNITS];
extern const float ep_embedding[EP_CLASSES][EP_DIM];
/* The data: in flash (model.c) on a microcontroller, read from data.bin (files.c) on Linux. */
extern const ep_sample (*ep_train_x)[EP_IN];
extern const uint8_t *ep_train_y;
extern const ep_sample (*ep_test_x)[EP_IN];
extern const uint8_t *ep_test_y;
extern float ep_state[EP_STATE_FLOATS];  /* every unit's state: in flash, or in RAM on Linux */

#define EP_NBATCHES ((EP_NTRAIN + EP_BATCH - 1) / EP_BATCH)
#define EP_TOTAL ((uint64_t)EP_UNITS * EP_NBATCHES * EP_EPOCHS)  /* work items: one unit's step each */

/* Where a run is: what a checkpoint holds besides the state. */
typedef struct {
    uint64_t done;             /* work items done */
    uint32_t steps[EP_UNITS];  /* each unit's updates so far */
    double loss[EP_UNITS];     /* each unit's loss summed over its current epoch */
} ep_progress;

/* The driver. */
int ep_train(ep_progress *p, uint64_t to);  /* work items p->done .. to-1: 0, or 1 on a non-finite loss */
void ep_report_accuracy(void);              /* "ep accuracy ..." lines, from ep_state */
void ep_say(const char *what, int64_t value);  /* an "ep WHAT VALUE" line */

/* The platform. */
void ep_write(const char *text);                                   /* text to the host's console */
void ep_save(const char *path, const void *data, uint32_t bytes);  /* a file on the host */
uint32_t ep_ticks(void);      /* a free-running down-counter of EP_TICK_MASK + 1 ticks (0: none) */
extern const uint32_t ep_tick_mask;
long ep_stack_used(void);     /* the stack's high-water mark in bytes, -1 where unknown */
uint32_t ep_calibrate(uint32_t loops);  /* ticks that `loops` two-instruction loop turns take */

#endif
