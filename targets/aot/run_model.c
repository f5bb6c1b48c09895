/* A small C program that loads a model kiln compiled ahead of time and runs it, with no LLVM
 * or MLIR anywhere: `kiln compile MODEL --target cpu -o DIR` writes DIR/lib<name>.so; then
 *
 *   cc -O2 run_model.c -o run_model -ldl
 *   ./run_model DIR/libmodel.so in0.bin [in1.bin ...] -- out0.bin [out1.bin ...]
 *
 * Inputs and outputs are raw little-endian f32 files (row-major), as numpy's tofile writes.
 * Uses the library's generic entry points: kiln_num_inputs/outputs, kiln_input_elements,
 * kiln_output_elements, kiln_arena_bytes and kiln_run. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float *read_f32(const char *path, int64_t want) {
  FILE *f = fopen(path, "rb");
  if (!f) { fprintf(stderr, "cannot open %s\n", path); return NULL; }
  float *p = malloc((size_t)want * sizeof(float));
  size_t got = fread(p, sizeof(float), (size_t)want, f);
  fclose(f);
  if ((int64_t)got != want) { fprintf(stderr, "%s: %zu floats, the model takes %lld\n", path, got, (long long)want); free(p); return NULL; }
  return p;
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: %s LIB.so IN.bin... -- OUT.bin...\n", argv[0]); return 2; }
  void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  const int64_t *ni = dlsym(lib, "kiln_num_inputs"), *no = dlsym(lib, "kiln_num_outputs");
  const int64_t *ie = dlsym(lib, "kiln_input_elements"), *oe = dlsym(lib, "kiln_output_elements");
  size_t (*arena_bytes)(void) = (size_t (*)(void))dlsym(lib, "kiln_arena_bytes");
  int (*run)(const float *const *, float *const *, void *) = (int (*)(const float *const *, float *const *, void *))dlsym(lib, "kiln_run");
  if (!ni || !no || !ie || !oe || !arena_bytes || !run) { fprintf(stderr, "%s is not a kiln model\n", argv[1]); return 1; }
  int sep = 2;
  while (sep < argc && strcmp(argv[sep], "--") != 0) sep++;
  if (sep - 2 != *ni || argc - sep - 1 != *no) {
    fprintf(stderr, "the model takes %lld inputs and gives %lld outputs\n", (long long)*ni, (long long)*no);
    return 2;
  }
  const float **in = calloc((size_t)*ni + 1, sizeof *in);
  float **out = calloc((size_t)*no + 1, sizeof *out);
  for (int64_t i = 0; i < *ni; i++) if (!(in[i] = read_f32(argv[2 + i], ie[i]))) return 1;
  for (int64_t j = 0; j < *no; j++) out[j] = malloc((size_t)oe[j] * sizeof(float));
  void *arena = NULL;
  if (arena_bytes() > 0 && posix_memalign(&arena, 64, arena_bytes()) != 0) return 1;
  if (run(in, out, arena) != 0) { fprintf(stderr, "run failed\n"); return 1; }
  for (int64_t j = 0; j < *no; j++) {
    FILE *f = fopen(argv[sep + 1 + j], "wb");
    if (!f || fwrite(out[j], sizeof(float), (size_t)oe[j], f) != (size_t)oe[j]) { fprintf(stderr, "cannot write %s\n", argv[sep + 1 + j]); return 1; }
    fclose(f);
    printf("output %lld: %lld floats, first %g\n", (long long)j, (long long)oe[j], out[j][0]);
  }
  return 0;
}
