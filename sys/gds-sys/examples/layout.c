/* Prints the layouts gds-sys asserts, from the real cufile.h:
 *   cc -I/usr/local/cuda/include sys/gds-sys/examples/layout.c -o layout && ./layout
 * Expected: 8 56 32 52 24 16 64 40 48 56 24 16 */
#include <stddef.h>
#include <stdio.h>
#include <sys/socket.h>
#include "cufile.h"
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(CUfileError_t), sizeof(CUfileDrvProps_t),
           offsetof(CUfileDrvProps_t, fflags), offsetof(CUfileDrvProps_t, max_batch_io_timeout_msecs),
           sizeof(CUfileDescr_t), offsetof(CUfileDescr_t, fs_ops), sizeof(CUfileIOParams_t),
           offsetof(CUfileIOParams_t, fh), offsetof(CUfileIOParams_t, opcode), offsetof(CUfileIOParams_t, cookie),
           sizeof(CUfileIOEvents_t), offsetof(CUfileIOEvents_t, ret));
    return 0;
}
