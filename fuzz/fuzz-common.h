/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What every fuzz harness shares: libFuzzer's entry point, which
 * replay.c's plain main() calls too, and the check of an invariant.
 */
#ifndef QBM_FUZZ_COMMON_H
#define QBM_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A violated invariant aborts, which is what the fuzzer reports. */
#define CHECK(cond)                                                           \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "invariant failed: %s (%s:%d)\n", #cond,          \
                    __FILE__, __LINE__);                                      \
            abort();                                                          \
        }                                                                     \
    } while (0)

#endif
