/* edgeprop's driver: trains a NoProp-DT bundle on a microcontroller (block by block, the data
 * and weights in flash) or on Linux with no Python (EP_LINUX, `deploy --target native`: the
 * data and checkpoints in files, block-sequential or interleaved), then measures test accuracy with the inference chain at the bundle's temperature (0: the mean
 * chain) and with the paper's sampled chain (temperature 1).
 *
 * Memory: the data subset, the label embedding, the graphs' code and constants and every
 * unit's weights and optimizer state are in flash. SRAM holds one static arena: the state of
 * the unit that is training (copied in from flash, stepped in place, written back when the
 * unit is done), one batch, the epoch's sample order and the graphs' planned scratch. No
 * malloc anywhere. On Linux (EP_STATE_IN_RAM) every unit's state is in RAM and steps in place.
 *
 * Every step is fed what edgeprop's numpy trainer feeds it, in its order, from the
 * same seed (edgeprop/rules/base.py, noprop_dt.py): the order of samples from the portable
 * generator (prng.h), the last batch padded with sample 0 and mask 0, x normalised in float
 * ((x - mean) / std), z = sqrt(ab) u + sqrt(1 - ab) eps computed in double and rounded to
 * float, lr and step as floats. Build with -ffp-contract=off so no product is fused.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "edgeprop_fw.h"
#include "prng.h"

#define EP_MAXDIM (EP_DIM > EP_CLASSES ? EP_DIM : EP_CLASSES)

/* One arena, in SRAM. Training and evaluation never overlap, so their buffers share bytes.
 * With EP_STATE_IN_RAM (Linux) every unit's state is in RAM and steps where it lies. */
struct ep_train {
#ifndef EP_STATE_IN_RAM
    float state[EP_SLOTS][EP_PMAX];  /* param, opt.m, opt.v of the unit that is training */
#endif
    float x[EP_BATCH * EP_IN], z[EP_BATCH * EP_DIM], target[EP_BATCH * EP_MAXDIM], mask[EP_BATCH];
    float loss_scale, lr, step, loss;
    ep_index order[EP_NTRAIN];
};
struct ep_eval {
    float x[EP_BATCH * EP_IN], z[EP_BATCH * EP_DIM], eps[EP_BATCH * EP_DIM], out[EP_BATCH * EP_MAXDIM];
};
static struct {
    union {
        struct ep_train train;
        struct ep_eval eval;
    } u;
} edgeprop_arena __attribute__((aligned(8)));
unsigned char edgeprop_scratch[EP_SCRATCH_BYTES] __attribute__((aligned(64)));  /* the graphs' temporaries */

#ifndef EP_STATE_IN_RAM
/* Weights go back to flash when a unit has trained. On the emulated board the memory at
 * 0x0 is writable, so this is a copy; on a real STM32 it would unlock the flash controller,
 * erase the sectors that hold the unit's state (flash erases whole sectors, so give the
 * state sector-aligned room of its own) and program the new words, with interrupts off. */
static void flash_write(float *dst, const float *src, uint32_t n) { memcpy(dst, src, n * sizeof(float)); }
#endif

/* -- text out, without printf (newlib's would malloc) ---------------------------------------- */
static char line[160];
static uint32_t used;

static void put(const char *s) {
    while (*s && used < sizeof line - 1) line[used++] = *s++;
}

static void put_int(int64_t v) {
    char digits[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)(-v) : (uint64_t)v;
    do digits[n++] = (char)('0' + u % 10); while ((u /= 10) && n < 23);
    if (v < 0) put("-");
    while (n) {
        char c[2] = {digits[--n], 0};
        put(c);
    }
}

static void put_hex(uint32_t v) {  /* a float's bits: exact */
    char c[9];
    for (int i = 7; i >= 0; --i, v >>= 4) c[i] = "0123456789abcdef"[v & 15];
    c[8] = 0;
    put(c);
}

static void put_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    put_hex(bits);
}

static void end_line(void) {
    line[used++] = '\n';
    line[used] = 0;
    ep_write(line);
    used = 0;
}

/* -- feeding a step ---------------------------------------------------------------------- */
static void normalise(const ep_sample *raw, float *x) {
    for (uint32_t i = 0; i < EP_IN; ++i) x[i] = ((float)raw[i] - EP_MEAN) / EP_STD;
}

/* The inputs of unit `index`'s step on batch `batch` of `epoch` (after the epoch's order). */
static void feed(const ep_unit *unit, uint32_t index, uint32_t epoch, uint32_t batch) {
    struct ep_train *a = &edgeprop_arena.u.train;
    uint64_t words[5] = {EP_SEED, EP_NOISE, epoch, batch, index};
    ep_normal(ep_key(words, 5), a->z, EP_BATCH * EP_DIM);  /* eps, made into z below */
    for (uint32_t i = 0; i < EP_BATCH; ++i) {
        uint32_t pos = batch * EP_BATCH + i;
        uint32_t s = pos < EP_NTRAIN ? a->order[pos] : 0;  /* padding: sample 0, masked out */
        a->mask[i] = pos < EP_NTRAIN ? 1.0f : 0.0f;
        const float *u = ep_embedding[ep_train_y[s]];
        for (uint32_t j = 0; j < EP_DIM; ++j) {
            float *z = &a->z[i * EP_DIM + j];
            *z = (float)(unit->z_signal * (double)u[j] + unit->z_noise * (double)*z);
        }
        if (unit->is_head) {
            for (uint32_t c = 0; c < EP_CLASSES; ++c) a->target[i * EP_CLASSES + c] = c == ep_train_y[s] ? 1.0f : 0.0f;
        } else {
            memcpy(&a->target[i * EP_DIM], u, sizeof(float) * EP_DIM);
            normalise(ep_train_x[s], &a->x[i * EP_IN]);
        }
    }
}

static void run(const ep_graph *g, void *const *buffers) {
    void *io[EP_BUFFERS + 4];
    for (uint32_t i = 0; i < g->n_io; ++i) io[i] = buffers[g->io[i]];
    g->run(io);
}

/* Work item i of the run -> (unit, epoch, batch), as edgeprop.rules.base.Plan.item orders them. */
static void work_item(uint64_t i, uint32_t *unit, uint32_t *epoch, uint32_t *batch) {
#if EP_INTERLEAVED  /* every unit steps on each batch, in order */
    *unit = (uint32_t)(i % EP_UNITS), *epoch = (uint32_t)(i / ((uint64_t)EP_UNITS * EP_NBATCHES));
    *batch = (uint32_t)(i / EP_UNITS % EP_NBATCHES);
#else  /* block-sequential: one unit to completion */
    *unit = (uint32_t)(i / ((uint64_t)EP_NBATCHES * EP_EPOCHS)), *epoch = (uint32_t)(i / EP_NBATCHES % EP_EPOCHS);
    *batch = (uint32_t)(i % EP_NBATCHES);
#endif
}

static void *buffers[EP_BUFFERS];
static uint32_t current = EP_UNITS;          /* the unit whose state the buffers hold (EP_UNITS: none) */
static uint32_t order_epoch = UINT32_MAX;    /* the epoch whose sample order is in the arena */
static uint64_t ticks[EP_UNITS];

/* Write the current unit's state back (a microcontroller's SRAM copy to flash). */
static void release(void) {
#ifndef EP_STATE_IN_RAM
    const ep_unit *unit = &ep_units[current];
    if (current < EP_UNITS)
        for (uint32_t s = 0; s < EP_SLOTS; ++s)
            flash_write(unit->state + s * unit->n_params, edgeprop_arena.u.train.state[s], unit->n_params);
#endif
    current = EP_UNITS;
}

/* The step buffers on unit `index`'s state: copied from flash into SRAM on a microcontroller
 * (written back when another unit takes over), stepped where it lies with EP_STATE_IN_RAM. */
static void select_unit(uint32_t index) {
    struct ep_train *a = &edgeprop_arena.u.train;
    const ep_unit *unit = &ep_units[index];
    if (index == current) return;
    release();
    for (uint32_t s = 0; s < EP_SLOTS; ++s) {
#ifdef EP_STATE_IN_RAM
        buffers[EP_STATE0 + s] = unit->state + s * unit->n_params;
#else
        memcpy(a->state[s], unit->state + s * unit->n_params, sizeof(float) * unit->n_params);
        buffers[EP_STATE0 + s] = a->state[s];
#endif
    }
    a->loss_scale = unit->loss_scale;
    a->lr = unit->lr;
    current = index;
}

/* Run work items p->done .. to-1; print each unit's mean loss as it ends an epoch. Returns 0,
 * or 1 when a step's loss is not finite (the run stops there; its state is not to be kept). */
int ep_train(ep_progress *p, uint64_t to) {
    struct ep_train *a = &edgeprop_arena.u.train;
    buffers[EP_X] = a->x, buffers[EP_Z] = a->z, buffers[EP_TARGET] = a->target, buffers[EP_MASK] = a->mask;
    buffers[EP_LOSS_SCALE] = &a->loss_scale, buffers[EP_LR] = &a->lr, buffers[EP_STEP] = &a->step;
    buffers[EP_LOSS] = &a->loss;
    for (; p->done < to; ++p->done) {
        uint32_t index, epoch, batch;
        work_item(p->done, &index, &epoch, &batch);
        const ep_unit *unit = &ep_units[index];
        select_unit(index);
        if (epoch != order_epoch) {
            uint64_t words[3] = {EP_SEED, EP_ORDER, epoch};
            ep_permutation(ep_key(words, 3), a->order, EP_NTRAIN);
            order_epoch = epoch;
        }
        feed(unit, index, epoch, batch);
        a->step = (float)++p->steps[index];
        uint32_t start = ep_ticks();
        run(&unit->step, buffers);
        ticks[index] += (start - ep_ticks()) & ep_tick_mask;
        if (!isfinite(a->loss)) {
            put("ep diverged "), put(unit->name), put(" "), put_int(p->steps[index]), put(" "), put_float(a->loss);
            end_line();
            current = EP_UNITS, order_epoch = UINT32_MAX;
            return 1;
        }
        p->loss[index] += (double)a->loss;
        if (batch == EP_NBATCHES - 1) {
            put("ep loss "), put(unit->name), put(" "), put_int(epoch), put(" ");
            put_float((float)(p->loss[index] / EP_NBATCHES));
            end_line();
            p->loss[index] = 0;
        }
        if (p->steps[index] == (uint32_t)EP_EPOCHS * EP_NBATCHES) {
            put("ep ticks "), put(unit->name), put(" "), put_int(p->steps[index]), put(" "), put_int((int64_t)ticks[index]);
            end_line();
        }
    }
    release();
    order_epoch = UINT32_MAX;  /* evaluation reuses the arena */
    return 0;
}

/* Test accuracy of the chain z_0 ~ N(0, I), z_t = a u_hat + b z + tau sqrt(c) eps, argmax
 * head(z_T), as edgeprop's numpy predict() computes it (the weights read from flash). tau is the
 * inference temperature: 0 the mean chain, 1 the paper's sampled chain. */
static uint32_t evaluate(double tau) {
    struct ep_eval *a = &edgeprop_arena.u.eval;
    uint32_t correct = 0;
    for (uint32_t start = 0, batch = 0; start < EP_NTEST; start += EP_BATCH, ++batch) {
        uint32_t n = EP_NTEST - start < EP_BATCH ? EP_NTEST - start : EP_BATCH;
        static const ep_sample zero[EP_IN];
        for (uint32_t i = 0; i < EP_BATCH; ++i) normalise(i < n ? ep_test_x[start + i] : zero, &a->x[i * EP_IN]);
        uint64_t words[4] = {EP_EVAL_SEED, EP_INFERENCE, batch, 0};
        ep_normal(ep_key(words, 4), a->z, EP_BATCH * EP_DIM);
        for (uint32_t index = 0; index < EP_UNITS; ++index) {
            const ep_unit *unit = &ep_units[index];
            void *buffers[EP_BUFFERS] = {0};
            buffers[EP_STATE0] = unit->state, buffers[EP_X] = a->x, buffers[EP_Z] = a->z, buffers[EP_OUT] = a->out;
            run(&unit->infer, buffers);
            if (unit->is_head) break;
            words[3] = index + 1;  /* block t = index + 1 */
            ep_normal(ep_key(words, 4), a->eps, EP_BATCH * EP_DIM);
            for (uint32_t i = 0; i < EP_BATCH * EP_DIM; ++i) {
                float mixed = unit->infer_a * a->out[i] + unit->infer_b * a->z[i];  /* float, like numpy */
                a->z[i] = (float)((double)mixed + tau * unit->infer_sqrt_c * (double)a->eps[i]);
            }
        }
        for (uint32_t i = 0; i < n; ++i) {
            const float *logits = &a->out[i * EP_CLASSES];
            uint32_t best = 0;
            for (uint32_t c = 1; c < EP_CLASSES; ++c) best = logits[c] > logits[best] ? c : best;
            correct += best == ep_test_y[start + i];
        }
    }
    return correct;
}

/* "ep accuracy" at the bundle's tau (or deploy --temperature), and the paper's sampled chain beside it. */
void ep_report_accuracy(void) {
    uint32_t correct = evaluate(EP_TEMPERATURE);
    put("ep accuracy "), put_int(correct), put(" "), put_int(EP_NTEST);
    end_line();
    if (EP_TEMPERATURE != 1.0) {
        correct = evaluate(1.0);
        put("ep accuracy-sampled "), put_int(correct), put(" "), put_int(EP_NTEST);
        end_line();
    }
}

void ep_say(const char *what, int64_t value) {
    put("ep "), put(what), put(" "), put_int(value);
    end_line();
}

#ifndef EP_LINUX  /* a microcontroller: train everything, save the weights, evaluate (Linux: train.c, eval.c) */
int main(void) {
    static ep_progress progress;
    put("ep start units "), put_int(EP_UNITS), put(" train "), put_int(EP_NTRAIN), put(" test "), put_int(EP_NTEST);
    put(" epochs "), put_int(EP_EPOCHS), put(" arena "), put_int((int64_t)sizeof edgeprop_arena);
    put(" scratch "), put_int(EP_SCRATCH_BYTES);
    end_line();
    if (ep_tick_mask) {  /* ticks per instruction, for the benchmark's instruction counts */
        put("ep calibrate 2000000 "), put_int(ep_calibrate(1000000));
        end_line();
    }
    if (ep_train(&progress, EP_TOTAL) != 0) return 1;
    ep_save("weights.bin", ep_state, sizeof ep_state);
    ep_report_accuracy();
    long stack = ep_stack_used();
    if (stack >= 0) ep_say("stack", stack);
    put("ep done");
    end_line();
    return 0;
}
#endif
