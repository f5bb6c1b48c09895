// kiln from C++: a small RAII wrapper over the C API (handles freed by destructors, errors as
// exceptions), compiling an ONNX model for `cpu` and checking it against the reference.
//
//   c++ -std=c++17 example.cpp -I compiler/capi/include -L target/release -lkiln_capi -o example_cpp
//   ./example_cpp examples/tiny_cnn/model.onnx
#include "kiln.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln {

struct Error : std::runtime_error {
    KilnStatus status;
    Error(KilnStatus s, const std::string &what) : std::runtime_error(what), status(s) {}
};

static void check(KilnStatus s) {
    if (s != KILN_OK) throw Error(s, kiln_last_error());
}

struct Output {
    std::vector<int64_t> shape;
    std::vector<float> values;
};

class Model {
    struct Free {
        void operator()(KilnModel *m) const { kiln_model_free(m); }
    };
    std::unique_ptr<KilnModel, Free> m_;

  public:
    Model(const std::string &path, const char *target) {
        KilnOptions o = kiln_options_default();
        o.target = target;
        KilnModel *m = nullptr;
        check(kiln_compile_file(path.c_str(), &o, &m));
        m_.reset(m);
    }

    struct Io {
        std::string name;
        int32_t dtype;
        std::vector<int64_t> dims;
    };

    std::vector<Io> inputs() const {
        size_t n_in, n_out;
        check(kiln_model_io_count(m_.get(), &n_in, &n_out));
        std::vector<Io> ios;
        for (size_t i = 0; i < n_in; i++) {
            const char *name;
            int32_t dtype;
            size_t rank;
            check(kiln_model_io(m_.get(), false, i, &name, &dtype, &rank, nullptr, 0));
            Io io{name, dtype, std::vector<int64_t>(rank)};
            check(kiln_model_io(m_.get(), false, i, &name, &dtype, &rank, io.dims.data(), rank));
            ios.push_back(io);
        }
        return ios;
    }

    // Runs on float inputs (shapes and values), returns float outputs.
    std::vector<Output> run(const std::vector<std::pair<std::vector<int64_t>, std::vector<float>>> &ins) {
        std::vector<KilnTensorView> views;
        for (auto &in : ins)
            views.push_back({KILN_FLOAT, in.first.data(), in.first.size(), in.second.data(), in.second.size() * 4});
        size_t n_in, n_out;
        check(kiln_model_io_count(m_.get(), &n_in, &n_out));
        std::vector<KilnTensor *> outs(n_out, nullptr);
        check(kiln_run(m_.get(), views.data(), views.size(), outs.data(), n_out));
        std::vector<Output> result;
        for (KilnTensor *t : outs) {
            std::unique_ptr<KilnTensor, KilnStatus (*)(KilnTensor *)> owned(t, kiln_tensor_free);
            int32_t dtype;
            size_t rank, nbytes;
            const int64_t *shape;
            const void *data;
            check(kiln_tensor_shape(t, &dtype, &rank, &shape));
            check(kiln_tensor_data(t, &data, &nbytes));
            if (dtype != KILN_FLOAT) throw std::runtime_error("this example reads float outputs");
            const float *f = static_cast<const float *>(data);
            result.push_back({std::vector<int64_t>(shape, shape + rank), std::vector<float>(f, f + nbytes / 4)});
        }
        return result;
    }
};

}  // namespace kiln

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL.onnx\n", argv[0]);
        return 2;
    }
    try {
        kiln::Model native(argv[1], "cpu"), ref(argv[1], "ref");
        std::vector<std::pair<std::vector<int64_t>, std::vector<float>>> ins;
        for (auto &io : native.inputs()) {
            size_t count = 1;
            for (auto &d : io.dims) {
                if (d < 0) d = 3;  // a symbolic dim: any size runs
                count *= size_t(d);
            }
            std::vector<float> v(count);
            for (size_t k = 0; k < count; k++) v[k] = std::cos(0.02f * float(k));
            std::printf("input %s: %zu values\n", io.name.c_str(), count);
            ins.push_back({io.dims, v});
        }
        auto got = native.run(ins), want = ref.run(ins);
        for (size_t o = 0; o < got.size(); o++) {
            double worst = 0;
            for (size_t k = 0; k < got[o].values.size(); k++) {
                double x = got[o].values[k], y = want[o].values[k];
                worst = std::fmax(worst, std::fabs(x - y) / (1e-4 + 1e-3 * std::fabs(y)));
            }
            std::printf("output %zu: %zu values, worst error vs ref %.3f of tolerance\n", o, got[o].values.size(),
                        worst);
            if (got[o].shape != want[o].shape || worst > 1.0) {
                std::fprintf(stderr, "FAIL: output %zu differs from the reference\n", o);
                return 1;
            }
        }
        // A bad call throws kiln::Error with the status and kiln's message.
        try {
            ins.pop_back();
            native.run(ins);
            std::fprintf(stderr, "FAIL: a missing input was accepted\n");
            return 1;
        } catch (const kiln::Error &e) {
            std::printf("refused as expected (status %d): %s\n", int(e.status), e.what());
            if (e.status != KILN_ERR_INPUT) return 1;
        }
        try {
            kiln::Model missing("no/such/model.onnx", "cpu");
            return 1;
        } catch (const kiln::Error &e) {
            std::printf("refused as expected (status %d): %s\n", int(e.status), e.what());
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "FAIL: %s\n", e.what());
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
}
