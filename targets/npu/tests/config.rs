//! Machine descriptions: presets load and validate; bad descriptions give exact errors.

use kiln_npu::{NpuConfig, NpuError};

#[test]
fn presets_load_and_validate() {
    for name in ["davinci", "sunway", "mlu"] {
        let cfg = NpuConfig::preset(name).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.name, name);
        let m = cfg.machine();
        assert_eq!(m.name, format!("npu-{name}"));
        assert!(m.levels.len() >= 2, "{name}: {m:?}");
        // The fastest level is the vector unit's: fused intermediates stay there.
        assert_eq!(m.fast_level().unwrap().name, cfg.vector.level);
        assert!(m.vector_gflops > 0.0);
        // Round trip through JSON.
        let again = NpuConfig::from_json(&cfg.to_json(), "again.json").unwrap();
        assert_eq!(again, cfg);
    }
    let d = NpuConfig::preset("davinci").unwrap();
    assert_eq!(d.machine().matrix_shape, vec![16, 16, 16]);
    assert_eq!(d.route(0, d.level_index("L0A").unwrap()).unwrap().len(), 3, "GM -> L1 -> L0A");
    assert!(NpuConfig::preset("sunway").unwrap().matrix.is_none());
    assert_eq!(NpuConfig::preset("sunway").unwrap().machine().matrix_gflops, 0.0);
}

fn davinci_json() -> serde_json::Value {
    serde_json::from_str(&NpuConfig::preset("davinci").unwrap().to_json()).unwrap()
}

fn error_of(v: serde_json::Value) -> String {
    match NpuConfig::from_json(&v.to_string(), "davinci.json") {
        Err(e @ NpuError::BadConfig { .. }) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn bad_descriptions_give_exact_errors() {
    let mut v = davinci_json();
    v["levels"][5]["capacity_bytes"] = 0.into();
    assert_eq!(error_of(v), "npu config davinci.json: level 'UB' has capacity 0");

    let mut v = davinci_json();
    v["clock_ghz"] = 0.0.into();
    assert_eq!(error_of(v), "npu config davinci.json: clock_ghz is 0, expected a positive number");

    let mut v = davinci_json();
    v["vector"]["level"] = "VB".into();
    assert_eq!(
        error_of(v),
        "npu config davinci.json: the vector unit names level 'VB', which is not among the levels (GM, L1, L0A, L0B, L0C, UB)"
    );

    // A missing level: drop UB; the vector unit and the DMA paths name it.
    let mut v = davinci_json();
    v["levels"].as_array_mut().unwrap().pop();
    assert_eq!(
        error_of(v),
        "npu config davinci.json: DMA path GM -> UB names level 'UB', which is not among the levels (GM, L1, L0A, L0B, L0C)"
    );

    // No route into the vector unit's level.
    let mut v = davinci_json();
    v["dma"].as_array_mut().unwrap().retain(|p| p["to"] != "UB");
    assert_eq!(
        error_of(v),
        "npu config davinci.json: no DMA path from 'GM' to 'UB' (the vector unit's operands come from and go to global memory)"
    );

    let mut v = davinci_json();
    v["matrix"]["k"] = 0.into();
    assert_eq!(error_of(v), "npu config davinci.json: matrix tile is 16x16x0, expected positive sizes");

    let mut v = davinci_json();
    v["matrix"]["f32_macs_per_cycle"] = 0.into();
    assert_eq!(
        error_of(v),
        "npu config davinci.json: matrix f32_macs_per_cycle is 0, expected at least 1 (or leave it out)"
    );

    // Without an f32 rate, f32 runs at the native rate.
    let mut v = davinci_json();
    v["matrix"].as_object_mut().unwrap().remove("f32_macs_per_cycle");
    let cfg = NpuConfig::from_json(&v.to_string(), "davinci.json").unwrap();
    assert_eq!(cfg.matrix.as_ref().unwrap().f32_rate(), 4096);
    let davinci = NpuConfig::preset("davinci").unwrap();
    assert_eq!(davinci.matrix.as_ref().unwrap().f32_rate(), 1024);
    assert_eq!(davinci.matrix.as_ref().unwrap().tile_cycles(), 4);

    let mut v = davinci_json();
    v["dma"][0]["bytes_per_cycle"] = (-1.0).into();
    assert_eq!(
        error_of(v),
        "npu config davinci.json: DMA path GM -> UB has bandwidth -1 bytes/cycle, expected a positive number"
    );

    let mut v = davinci_json();
    v["levels"][1]["align_bytes"] = 48.into();
    assert_eq!(error_of(v), "npu config davinci.json: level 'L1' has alignment 48, expected a power of two ≥ 4");

    let mut v = davinci_json();
    v["levels"][0]["name"] = "UB".into();
    assert_eq!(error_of(v), "npu config davinci.json: level 'UB' is listed twice");

    // Unknown fields and malformed JSON are errors too, never panics.
    let mut v = davinci_json();
    v["colour"] = "blue".into();
    assert!(error_of(v).contains("unknown field `colour`"));
    for text in ["", "{", "[]", "null", "{\"name\": 3}", "\u{0}"] {
        assert!(matches!(NpuConfig::from_json(text, "x.json"), Err(NpuError::BadConfig { .. })), "{text:?}");
    }
    assert_eq!(
        NpuConfig::preset("tpu").unwrap_err().to_string(),
        "npu config tpu: no preset named 'tpu' (presets: davinci, sunway, mlu)"
    );
}
