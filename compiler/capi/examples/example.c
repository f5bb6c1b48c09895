/* kiln from C: compile an ONNX model for `cpu` and for the reference interpreter, run both on
 * the same inputs, compare, and show how errors are reported.
 *
 *   cc example.c -I compiler/capi/include -L target/release -lkiln_capi -o example
 *   ./example examples/tiny_cnn/model.onnx
 *
 * Exits 0 when the native outputs match the reference and every bad call was refused with
 * the expected status and a message. */
#include "kiln.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, ...)                 \
    do {                                 \
        if (!(cond)) {                   \
            fprintf(stderr, "FAIL: ");   \
            fprintf(stderr, __VA_ARGS__); \
            fprintf(stderr, "\n");       \
            failures++;                  \
        }                                \
    } while (0)

/* A bad call must fail with `want` and say why. */
static void expect_error(KilnStatus got, KilnStatus want, const char *what) {
    const char *msg = kiln_last_error();
    CHECK(got == want, "%s: status %d, expected %d (%s)", what, (int)got, (int)want, msg);
    CHECK(msg != NULL && msg[0] != '\0', "%s: no error message", what);
    printf("refused as expected: %s: %s\n", what, msg);
}

static KilnModel *compile_for(const char *path, const char *target) {
    KilnOptions opts = kiln_options_default();
    opts.target = target;
    opts.threads = 1;
    KilnModel *model = NULL;
    KilnStatus s = kiln_compile_file(path, &opts, &model);
    if (s != KILN_OK) {
        fprintf(stderr, "compiling %s for %s: %s\n", path, target, kiln_last_error());
        exit(1);
    }
    return model;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    printf("kiln %s, targets: %s\n", kiln_version(), kiln_targets());
    KilnModel *native = compile_for(argv[1], "cpu");
    KilnModel *ref = compile_for(argv[1], "ref");

    size_t n_in = 0, n_out = 0;
    CHECK(kiln_model_io_count(native, &n_in, &n_out) == KILN_OK, "io_count: %s", kiln_last_error());
    if (n_in > 8 || n_out > 8) {
        fprintf(stderr, "this example handles up to 8 inputs and outputs\n");
        return 1;
    }

    /* Inputs: float tensors filled with a smooth pattern; symbolic dims get size 2. */
    KilnTensorView views[8];
    int64_t shapes[8][8];
    float *buffers[8] = {0};
    for (size_t i = 0; i < n_in; i++) {
        const char *name;
        int32_t dtype;
        size_t rank;
        CHECK(kiln_model_io(native, false, i, &name, &dtype, &rank, shapes[i], 8) == KILN_OK, "io: %s",
              kiln_last_error());
        if (dtype != KILN_FLOAT || rank > 8) {
            fprintf(stderr, "input '%s': this example feeds float inputs of rank <= 8\n", name);
            return 1;
        }
        size_t count = 1;
        printf("input %zu: %s float [", i, name);
        for (size_t d = 0; d < rank; d++) {
            if (shapes[i][d] < 0) shapes[i][d] = 2;
            count *= (size_t)shapes[i][d];
            printf("%s%lld", d ? ", " : "", (long long)shapes[i][d]);
        }
        printf("]\n");
        buffers[i] = malloc(count * sizeof(float));
        for (size_t k = 0; k < count; k++) buffers[i][k] = sinf(0.01f * (float)k + (float)i);
        views[i] = (KilnTensorView){KILN_FLOAT, shapes[i], rank, buffers[i], count * sizeof(float)};
    }

    KilnTensor *got[8], *want[8];
    CHECK(kiln_run(native, views, n_in, got, n_out) == KILN_OK, "run cpu: %s", kiln_last_error());
    CHECK(kiln_run(ref, views, n_in, want, n_out) == KILN_OK, "run ref: %s", kiln_last_error());
    for (size_t o = 0; o < n_out && failures == 0; o++) {
        const void *a, *b;
        size_t na, nb, rank;
        int32_t dtype;
        const int64_t *shape;
        CHECK(kiln_tensor_shape(got[o], &dtype, &rank, &shape) == KILN_OK, "shape: %s", kiln_last_error());
        CHECK(kiln_tensor_data(got[o], &a, &na) == KILN_OK, "data: %s", kiln_last_error());
        CHECK(kiln_tensor_data(want[o], &b, &nb) == KILN_OK, "data: %s", kiln_last_error());
        CHECK(na == nb && dtype == KILN_FLOAT, "output %zu: %zu vs %zu bytes, type %d", o, na, nb, dtype);
        double worst = 0, sum = 0;
        for (size_t k = 0; k < na / sizeof(float); k++) {
            double x = ((const float *)a)[k], y = ((const float *)b)[k];
            double err = fabs(x - y) / (1e-4 + 1e-3 * fabs(y));
            if (err > worst) worst = err;
            sum += x;
        }
        printf("output %zu: rank %zu, %zu values, sum %.6f, worst error vs ref %.3f of tolerance\n", o, rank,
               na / sizeof(float), sum, worst);
        CHECK(worst <= 1.0, "output %zu differs from the reference", o);
    }
    for (size_t o = 0; o < n_out; o++) {
        CHECK(kiln_tensor_free(got[o]) == KILN_OK, "free");
        CHECK(kiln_tensor_free(want[o]) == KILN_OK, "free");
    }

    /* Bad calls: each is refused with a status and a message; none crashes. */
    KilnModel *none = NULL;
    expect_error(kiln_compile_file(NULL, NULL, &none), KILN_ERR_NULL_ARGUMENT, "NULL path");
    expect_error(kiln_compile_file("no/such/model.onnx", NULL, &none), KILN_ERR_MODEL, "missing file");
    CHECK(none == NULL, "a failed compile leaves *out NULL");
    KilnOptions bad_target = kiln_options_default();
    bad_target.target = "tpu9000";
    expect_error(kiln_compile_file(argv[1], &bad_target, &none), KILN_ERR_COMPILE, "unknown target");
    const unsigned char junk[] = "definitely not protobuf";
    expect_error(kiln_compile_bytes(junk, sizeof junk, "junk.onnx", NULL, &none), KILN_ERR_MODEL, "junk bytes");
    expect_error(kiln_run(native, views, n_in, NULL, n_out), KILN_ERR_NULL_ARGUMENT, "NULL outputs");
    expect_error(kiln_run(native, views, n_in, got, n_out + 1), KILN_ERR_INVALID_ARGUMENT, "wrong output count");
    if (n_in > 0) {
        expect_error(kiln_run(native, views, n_in - 1, got, n_out), KILN_ERR_INPUT, "missing input");
        KilnTensorView wrong_type = views[0];
        wrong_type.dtype = KILN_INT32;
        KilnTensorView v[8];
        memcpy(v, views, sizeof views);
        v[0] = wrong_type;
        expect_error(kiln_run(native, v, n_in, got, n_out), KILN_ERR_INPUT, "int32 for a float input");
        v[0] = views[0];
        v[0].nbytes -= 4;
        expect_error(kiln_run(native, v, n_in, got, n_out), KILN_ERR_INVALID_ARGUMENT, "data shorter than shape");
        if (views[0].rank > 0) {
            int64_t other[8];
            size_t last = views[0].rank - 1;
            memcpy(other, shapes[0], sizeof other);
            other[last] += 1;
            size_t count = views[0].nbytes / sizeof(float) / (size_t)shapes[0][last] * (size_t)other[last];
            float *bigger = calloc(count, sizeof(float));
            v[0] = (KilnTensorView){KILN_FLOAT, other, views[0].rank, bigger, count * sizeof(float)};
            KilnStatus s = kiln_run(native, v, n_in, got, n_out);
            /* A symbolic last dim accepts another size; a fixed one does not. */
            if (s == KILN_OK) {
                for (size_t o = 0; o < n_out; o++) kiln_tensor_free(got[o]);
            } else {
                expect_error(s, KILN_ERR_INPUT, "wrong shape");
            }
            free(bigger);
        }
    }
    expect_error(kiln_model_io(native, false, 99, NULL, NULL, NULL, NULL, 0), KILN_ERR_INVALID_ARGUMENT,
                 "input index out of range");
    CHECK(kiln_model_free(ref) == KILN_OK, "free: %s", kiln_last_error());
    expect_error(kiln_model_io_count(ref, &n_in, &n_out), KILN_ERR_INVALID_HANDLE, "closed model");
    expect_error(kiln_run(ref, views, n_in, got, n_out), KILN_ERR_INVALID_HANDLE, "run on a closed model");
    expect_error(kiln_model_free(ref), KILN_ERR_INVALID_HANDLE, "double free");
    expect_error(kiln_model_free(NULL), KILN_ERR_NULL_ARGUMENT, "free NULL");
    expect_error(kiln_tensor_free((KilnTensor *)native), KILN_ERR_INVALID_HANDLE, "a model passed as a tensor");
    CHECK(kiln_model_free(native) == KILN_OK, "free: %s", kiln_last_error());
    for (size_t i = 0; i < n_in; i++) free(buffers[i]);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
