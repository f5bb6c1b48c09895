"""kiln's Python package as a user calls it: compile from a path, bytes or an onnx.ModelProto,
run with a dict or a list, read inputs/outputs, get clear exceptions for bad calls, and the GIL
released while compiling and running."""

import threading
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.reference
import pytest

import kiln


def reference(model: onnx.ModelProto, feeds: dict) -> list:
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)


def test_targets_lists_the_cli_targets():
    t = kiln.targets()
    assert "cpu" in t and "ref" in t and "npu" in t


@pytest.mark.parametrize("target", ["cpu", "ref", "npu"])
def test_compile_a_path_and_run_with_a_dict(tiny_cnn, target):
    m = kiln.compile(tiny_cnn, target=target)
    assert m.target == target
    assert m.inputs == [("x", "float32", ["N", 3, 16, 16])]
    assert [o[0] for o in m.outputs] == ["probs"]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
    (y,) = m.run({"x": x})
    (want,) = reference(onnx.load(tiny_cnn), {"x": x})
    assert y.shape == (2, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_compile_bytes_and_a_model_proto_and_run_with_a_list(tiny_cnn):
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    from_bytes = kiln.compile(tiny_cnn.read_bytes()).run([x])[0]
    from_proto = kiln.compile(onnx.load(tiny_cnn)).run([x])[0]
    np.testing.assert_array_equal(from_bytes, from_proto)
    assert from_bytes.shape == (3, 10)  # the symbolic batch dim runs at any size


def test_every_core_and_no_fusion_agree(tiny_cnn):
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16), dtype=np.float32)
    a = kiln.compile(tiny_cnn, threads=1).run([x])[0]
    b = kiln.compile(tiny_cnn, fusion=False, dims={"N": 2}).run([x])[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_float_dtypes_round_trip():
    g = oh.make_graph(
        [oh.make_node("Where", ["c", "a", "b"], ["y"]), oh.make_node("Cast", ["y"], ["z"], to=onnx.TensorProto.INT32)],
        "where",
        [
            oh.make_tensor_value_info("c", onnx.TensorProto.BOOL, [4]),
            oh.make_tensor_value_info("a", onnx.TensorProto.INT64, [4]),
            oh.make_tensor_value_info("b", onnx.TensorProto.INT64, [4]),
        ],
        [oh.make_tensor_value_info("z", onnx.TensorProto.INT32, [4])],
    )
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)])
    m = kiln.compile(model)
    (z,) = m.run([np.array([True, False, True, False]), np.arange(4), -np.arange(4)])
    assert z.dtype == np.int32
    np.testing.assert_array_equal(z, [0, -1, 2, -3])


def test_bfloat16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    g = oh.make_graph(
        [oh.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.BFLOAT16)],
        "to_bf16",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [3])],
    )
    m = kiln.compile(oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)]), target="ref")
    (y,) = m.run([np.array([1.0, 2.5, -3.0], np.float32)])
    assert y.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(y.astype(np.float32), [1.0, 2.5, -3.0])


def test_bad_calls_raise_clear_exceptions(tiny_cnn):
    m = kiln.compile(tiny_cnn)
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(kiln.InputError, match="expected element type float, got int32"):
        m.run([x.astype(np.int32)])
    with pytest.raises(kiln.InputError, match="expected dim 3 to be 16"):
        m.run([np.zeros((1, 3, 16, 17), np.float32)])
    with pytest.raises(kiln.InputError, match="no input 'y'"):
        m.run({"y": x})
    with pytest.raises(kiln.InputError, match="'x' is missing"):
        m.run({})
    with pytest.raises(kiln.InputError, match="expected 1 input"):
        m.run([x, x])
    with pytest.raises(kiln.InputError, match="expected element type float, got string"):
        m.run([np.array([{"a": 1}])])
    with pytest.raises(kiln.InputError, match="kiln does not support element type complex64"):
        m.run([np.zeros((1, 3, 16, 16), np.complex64)])
    with pytest.raises(kiln.ModelError, match="no/such.onnx"):
        kiln.compile("no/such.onnx")
    with pytest.raises(kiln.ModelError, match="not a valid ONNX model"):
        kiln.compile(b"\x00\x01 not protobuf")
    with pytest.raises(kiln.CompileError, match="unknown target 'tpu'"):
        kiln.compile(tiny_cnn, target="tpu")
    with pytest.raises(TypeError):
        kiln.compile(42)
    # Every kiln exception is a KilnError.
    assert issubclass(kiln.InputError, kiln.KilnError) and issubclass(kiln.KilnError, Exception)
    # The model still works after all that.
    assert m.run([x])[0].shape == (1, 10)


def test_unsupported_ops_are_all_named_at_once():
    g = oh.make_graph(
        [oh.make_node("Frobnicate", ["x"], ["y"], name="n1"), oh.make_node("Zap", ["y"], ["z"], name="n2")],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(kiln.ModelError, match=r"2 unsupported op\(s\): node 'n1' \(Frobnicate\), node 'n2' \(Zap\)"):
        kiln.compile(oh.make_model(g))


def _ticks_while(fn) -> int:
    """How often another Python thread ran while ``fn`` ran."""
    ticks = 0
    stop = threading.Event()

    def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.0005)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return ticks


def test_the_gil_is_released_while_compiling_and_running():
    # A model that takes a while: a chain of large matmuls.
    rng = np.random.default_rng(3)
    nodes, inits, prev = [], [], "x"
    for i in range(6):
        inits.append(onh.from_array(rng.standard_normal((512, 512)).astype(np.float32) / 22, f"w{i}"))
        nodes.append(oh.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    g = oh.make_graph(
        nodes,
        "chain",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [512, 512])],
        [oh.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [512, 512])],
        initializer=inits,
    )
    model = oh.make_model(g)
    holder = {}
    compile_ticks = _ticks_while(lambda: holder.setdefault("m", kiln.compile(model, target="ref")))
    x = rng.standard_normal((512, 512)).astype(np.float32)
    run_ticks = _ticks_while(lambda: [holder["m"].run([x]) for _ in range(3)])
    # With the GIL held the ticker would not run at all until fn returned.
    assert compile_ticks >= 2, compile_ticks
    assert run_ticks >= 5, run_ticks


def test_threads_share_a_model(tiny_cnn):
    m = kiln.compile(tiny_cnn)
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((2, 3, 16, 16), dtype=np.float32) for _ in range(4)]
    want = [m.run([x])[0] for x in xs]
    got = [None] * len(xs)

    def work(i):
        for _ in range(5):
            got[i] = m.run([xs[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_tune_then_compile_with_the_database(tiny_cnn, tmp_path):
    db = tmp_path / "tuning.jsonl"
    report = kiln.tune(tiny_cnn, db, target="npu", trials=3, dims={"N": 2})
    assert report["target"] == "npu" and report["measured"] >= 1
    lines = db.read_text().splitlines()
    assert len(lines) == report["measured"]
    for k in report["kernels"]:
        if k["skipped"] is None:
            assert k["best"] <= k["default"]
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16), dtype=np.float32)
    tuned = kiln.compile(tiny_cnn, target="npu", tuning_db=db).run([x])[0]
    plain = kiln.compile(tiny_cnn, target="ref").run([x])[0]
    np.testing.assert_allclose(tuned, plain, rtol=1e-4, atol=1e-5)
    with pytest.raises(kiln.KilnError, match="no such tuning database"):
        kiln.compile(tiny_cnn, tuning_db=tmp_path / "missing.jsonl")
