/* What the C clients of the tests share: a check that names its line and exits, and a
 * status check that prints the library's last error message. */
#ifndef GANTRY_TESTS_CHECK_H
#define GANTRY_TESTS_CHECK_H

#include "gantry.h"

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                               \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static inline void expect(gantry_status got, gantry_status want, const char *what) {
    char message[512];
    gantry_last_error_message(message, sizeof message);
    CHECK(got == want, "%s: got %s (%s), want %s", what, gantry_status_name(got), message,
          gantry_status_name(want));
}

#endif
