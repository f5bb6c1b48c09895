/* kiln's rvv kernel runner: the generic part of the static riscv64 executable that `rvv`
 * builds for each model (targets/src/rvv.rs). kiln prepends the table of the model's kernel
 * functions (KILN_FUNCTIONS, kiln_functions[]: MLIR's packed wrappers `_mlir_<name>`) and
 * links the kernels' object. The host keeps one runner per model alive under qemu-riscv64
 * and sends it one request per kernel launch over stdin; the results come back on stdout.
 *
 * Protocol: little-endian 64-bit words, then raw element data.
 *   hello (runner -> host, once): KILN_MAGIC, KILN_FUNCTIONS, VLEN in bits.
 *   request: function, buffers, inputs, lo, hi; then per buffer: element bytes, rank, its
 *            sizes; then every input buffer's data, row-major.
 *   reply:   status (0: ran; otherwise an error and the runner exits); when 0, every output
 *            buffer's data, row-major.
 * The runner exits when stdin closes. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KILN_MAGIC 0x317676726e6c696bLL /* "kilnrvv1" */

enum { STATUS_OK = 0, STATUS_NO_FUNCTION = 1, STATUS_NO_MEMORY = 2, STATUS_BAD_REQUEST = 3 };

static int get(void *p, size_t n) { return n == 0 || fread(p, 1, n, stdin) == n; }

static void put(const void *p, size_t n) {
  if (n > 0) fwrite(p, 1, n, stdout);
}

static void fail(int64_t status) {
  put(&status, sizeof status);
  fflush(stdout);
  exit((int)status);
}

int main(void) {
  setvbuf(stdin, NULL, _IOFBF, 1 << 20);
  setvbuf(stdout, NULL, _IOFBF, 1 << 20);
  int64_t vlenb;
  __asm__ volatile("csrr %0, 0xc22" : "=r"(vlenb)); /* vlenb: VLEN / 8 */
  int64_t hello[3] = { KILN_MAGIC, KILN_FUNCTIONS, vlenb * 8 };
  put(hello, sizeof hello);
  fflush(stdout);
  for (;;) {
    /* function, buffers, inputs, lo, hi */
    int64_t head[5];
    if (!get(head, sizeof head)) return 0; /* the host is done */
    int64_t function = head[0], n = head[1], inputs = head[2];
    if (n < 0 || n > 65536 || inputs < 0 || inputs > n) fail(STATUS_BAD_REQUEST);
    int64_t **desc = calloc((size_t)n + 1, sizeof *desc);
    void **data = calloc((size_t)n + 1, sizeof *data);
    size_t *bytes = calloc((size_t)n + 1, sizeof *bytes);
    void **args = calloc((size_t)n + 2, sizeof *args);
    if (!desc || !data || !bytes || !args) fail(STATUS_NO_MEMORY);
    for (int64_t b = 0; b < n; b++) {
      int64_t shape[2];
      if (!get(shape, sizeof shape)) return STATUS_BAD_REQUEST;
      int64_t elem = shape[0], rank = shape[1];
      if (elem <= 0 || elem > 8 || rank < 0 || rank > 64) fail(STATUS_BAD_REQUEST);
      /* A strided memref descriptor: allocated and aligned pointers, offset, sizes, strides. */
      desc[b] = malloc(sizeof(int64_t) * (size_t)(3 + 2 * rank));
      if (!desc[b]) fail(STATUS_NO_MEMORY);
      if (!get(desc[b] + 3, sizeof(int64_t) * (size_t)rank)) return STATUS_BAD_REQUEST;
      int64_t count = 1;
      for (int64_t a = rank - 1; a >= 0; a--) {
        desc[b][3 + rank + a] = count;
        count *= desc[b][3 + a];
      }
      bytes[b] = (size_t)count * (size_t)elem;
      data[b] = aligned_alloc(64, (bytes[b] + 63) / 64 * 64 + 64);
      if (!data[b]) fail(STATUS_NO_MEMORY);
      desc[b][0] = desc[b][1] = (int64_t)(intptr_t)data[b];
      desc[b][2] = 0;
    }
    for (int64_t b = 0; b < inputs; b++)
      if (!get(data[b], bytes[b])) return STATUS_BAD_REQUEST;
    if (function < 0 || function >= KILN_FUNCTIONS) fail(STATUS_NO_FUNCTION);
    /* The packed convention: one pointer per argument, pointing at it (for a memref, at a
     * pointer to its descriptor); then the shared loop's range. */
    for (int64_t b = 0; b < n; b++) args[b] = &desc[b];
    args[n] = &head[3];
    args[n + 1] = &head[4];
    kiln_functions[function](args);
    int64_t ok = STATUS_OK;
    put(&ok, sizeof ok);
    for (int64_t b = inputs; b < n; b++) put(data[b], bytes[b]);
    fflush(stdout);
    for (int64_t b = 0; b < n; b++) {
      free(desc[b]);
      free(data[b]);
    }
    free(desc);
    free(data);
    free(bytes);
    free(args);
  }
}
