//! The GGUF reader against fixtures written by llama.cpp's own Python package (`gguf`):
//! metadata of every type, every supported tensor type dequantized value for value, the q/k
//! un-permutation, and GGUF v2. Fixtures: tests/fixtures/gguf/make_fixtures.py.

use std::path::PathBuf;

use rbee_engine::gguf::{
    GgmlType, GgufFile, Value, ValueType, dequantize_to_vec, gguf_to_hf, split_q8_0, unpermute_qk,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

struct Expected {
    name: String,
    ty: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The reference values computed by `gguf.quants.dequantize`.
fn expected() -> Vec<Expected> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tensors.json")).unwrap()).unwrap();
    let raw = std::fs::read(fixtures().join("tensors.expected")).unwrap();
    let all: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let offset = t["offset"].as_u64().unwrap() as usize;
            let count = t["count"].as_u64().unwrap() as usize;
            Expected {
                name: t["name"].as_str().unwrap().to_string(),
                ty: t["type"].as_str().unwrap().to_string(),
                shape: t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                values: all[offset..offset + count].to_vec(),
            }
        })
        .collect()
}

fn open_fixture() -> GgufFile {
    GgufFile::open(fixtures().join("tensors.gguf")).expect("fixture opens")
}

/// Bit-for-bit equality: ggml's dequantization is a fixed sequence of f32 operations, and
/// ours performs the same ones, so not even the last bit (or the sign of a zero) may differ.
fn assert_same_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mismatches: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .take(5)
        .collect();
    assert!(
        mismatches.is_empty(),
        "{name}: first mismatches (index, (ours, reference)): {mismatches:?}"
    );
}

#[test]
fn header_and_metadata_of_every_type() {
    let f = open_fixture();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert!(f.data_offset().is_multiple_of(64));
    let md = f.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(md.value("test.u8"), Some(&Value::U8(200)));
    assert_eq!(md.value("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(md.value("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(md.value("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(md.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(md.get::<i32>("test.i32").unwrap(), -2_000_000_000);
    assert_eq!(md.get_f32("test.f32").unwrap(), 0.5);
    assert!(md.get_bool("test.bool").unwrap());
    assert_eq!(md.get_str("test.string").unwrap(), "héllo ▁ 世界");
    assert_eq!(md.get_u64("test.u64").unwrap(), (1 << 40) + 3);
    assert_eq!(md.get::<i64>("test.i64").unwrap(), -(1 << 40));
    assert_eq!(md.get::<f64>("test.f64").unwrap(), std::f64::consts::PI);
    assert_eq!(md.get_i32_array("test.array_i32").unwrap(), [1, -2, 3]);
    assert_eq!(md.get_f32_array("test.array_f32").unwrap(), [0.25, -1.5]);
    assert_eq!(md.get_str_array("test.array_str").unwrap(), ["a", "bc", ""]);
    assert_eq!(
        md.value("test.array_nested"),
        Some(&Value::Array(
            ValueType::Array,
            vec![
                Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(2)]),
                Value::Array(ValueType::I32, vec![Value::I32(3)]),
            ]
        ))
    );
    // Integers convert to any width they fit, and errors name the key and the file.
    assert_eq!(md.get::<u64>("test.u8").unwrap(), 200);
    let err = md.get::<u8>("test.u16").unwrap_err().to_string();
    assert!(
        err.contains("test.u16") && err.contains("tensors.gguf"),
        "{err}"
    );
    let err = md.get_str("test.u32").unwrap_err().to_string();
    assert!(
        err.contains("`test.u32`") && err.contains("expected a string"),
        "{err}"
    );
    let err = md.get_u32("no.such.key").unwrap_err().to_string();
    assert!(err.contains("`no.such.key` is missing"), "{err}");
    assert_eq!(md.get_opt::<u32>("no.such.key").unwrap(), None);
}

#[test]
fn model_config_from_metadata() {
    let cfg = open_fixture().model_config().unwrap();
    assert_eq!(cfg.architecture, "llama");
    assert_eq!(cfg.name.as_deref(), Some("rbee gguf fixture"));
    assert_eq!(cfg.context_length, 256);
    assert_eq!(cfg.embedding_length, 64);
    assert_eq!(cfg.block_count, 1);
    assert_eq!(cfg.feed_forward_length, 128);
    assert_eq!(cfg.head_count, 4);
    assert_eq!(cfg.head_count_kv, 2);
    assert_eq!(cfg.head_dim(), 16);
    assert_eq!(cfg.rope_freq_base, 10000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.vocab_size, 32);
    assert!(cfg.qk_permuted);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_id, Some(2));
    assert_eq!(cfg.eot_token_id, Some(3));
    assert_eq!(cfg.eog_token_ids, [2, 3]);
    assert_eq!(cfg.chat_template.as_deref(), Some("{{ messages }}"));
}

#[test]
fn every_tensor_type_matches_the_reference_dequantization() {
    let f = open_fixture();
    let mut seen = std::collections::HashSet::new();
    for e in expected().iter().filter(|e| !e.name.contains('#')) {
        let info = f.tensor_info(&e.name).unwrap();
        assert_eq!(info.ggml_type.to_string(), e.ty, "{}", e.name);
        assert_eq!(info.shape(), e.shape, "{}: shape", e.name);
        let t = f.tensor_f32(&e.name).unwrap();
        assert_eq!(t.shape, e.shape);
        assert_same_bits(&e.name, &t.data, &e.values);
        seen.insert(info.ggml_type);

        // The raw bytes are exposed as stored, and decode the same through the free function.
        let raw = f.raw_tensor(&e.name).unwrap();
        assert_eq!(raw.data.len() as u64, info.n_bytes);
        assert_eq!(
            raw.data.len(),
            e.values.len() / info.ggml_type.block_size() * info.ggml_type.type_size()
        );
        let again = dequantize_to_vec(raw.ggml_type(), raw.data, e.values.len()).unwrap();
        assert_same_bits(&e.name, &again, &e.values);
    }
    use GgmlType::*;
    for ty in [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
    ] {
        assert!(seen.contains(&ty), "no fixture tensor of type {ty}");
        assert!(ty.can_dequantize());
    }
}

#[test]
fn shapes_are_reversed_gguf_dims() {
    let f = open_fixture();
    let t = f.tensor_info("f32_3d").unwrap();
    assert_eq!(t.dims, [64, 3, 2]);
    assert_eq!(t.shape(), [2, 3, 64]);
    assert_eq!((t.row_len(), t.n_rows()), (64, 6));
    assert_eq!(f.tensor_info("f16_1d").unwrap().shape(), [256]);
    assert_eq!(f.tensor_info("q4_k").unwrap().dims, [512, 3]);
}

#[test]
fn unpermute_restores_hf_rows_of_q_and_k() {
    let f = open_fixture();
    let cfg = f.model_config().unwrap();
    let exp = expected();
    let find = |n: &str| exp.iter().find(|e| e.name == n).unwrap();
    for (name, heads) in [
        ("blk.0.attn_q.weight", cfg.head_count),
        ("blk.0.attn_k.weight", cfg.head_count_kv),
    ] {
        let mut t = f.tensor_f32(name).unwrap();
        unpermute_qk(&mut t.data, t.shape[0], t.shape[1], heads);
        assert_same_bits(name, &t.data, &find(&format!("{name}#hf")).values);

        // The same reordering on raw rows (as an engine keeping quantized weights would do).
        let raw = f.raw_tensor(name).unwrap();
        let mut bytes = raw.data.to_vec();
        let info = raw.info;
        unpermute_qk(
            &mut bytes,
            info.n_rows() as usize,
            info.row_bytes() as usize,
            heads,
        );
        let from_bytes = dequantize_to_vec(info.ggml_type, &bytes, t.data.len()).unwrap();
        assert_same_bits(name, &from_bytes, &t.data);
    }
    assert_eq!(
        gguf_to_hf("blk.0.attn_q.weight").as_deref(),
        Some("model.layers.0.self_attn.q_proj.weight")
    );
}

#[test]
fn version_2_files_parse_identically() {
    // v2 and v3 share the layout (v3 only added big-endian support), so patching the version
    // field must give the same file.
    let mut bytes = std::fs::read(fixtures().join("tensors.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufFile::from_bytes("v2.gguf", bytes).unwrap();
    let v3 = open_fixture();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.tensors(), v3.tensors());
    assert_eq!(
        v2.tensor_f32("q6_k").unwrap(),
        v3.tensor_f32("q6_k").unwrap()
    );
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let err = open_fixture()
        .tensor_f32("nope.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.weight") && err.contains("tensors.gguf"),
        "{err}"
    );
}

#[test]
fn q8_0_splits_into_quants_and_scales_losslessly() {
    let f = open_fixture();
    let raw = f.raw_tensor("q8_0").unwrap();
    let (quants, scales) = split_q8_0(raw.data).unwrap();
    let full = f.tensor_f32("q8_0").unwrap().data;
    assert_eq!((quants.len(), scales.len()), (full.len(), full.len() / 32));
    let rebuilt: Vec<f32> = quants
        .iter()
        .enumerate()
        .map(|(i, &q)| q as f32 * scales[i / 32])
        .collect();
    assert_same_bits("q8_0 split", &rebuilt, &full);
    assert!(split_q8_0(&raw.data[..33]).is_err());
}

#[test]
fn ggml_type_table_matches_gguf_py() {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tensors.json")).unwrap()).unwrap();
    let types = index["ggml_types"].as_object().unwrap();
    assert!(types.len() >= 30);
    for (name, v) in types {
        let id = v[0].as_u64().unwrap() as u32;
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("{name} ({id}) unknown"));
        assert_eq!(ty.to_string(), *name);
        assert_eq!(ty.id(), id);
        assert_eq!(
            ty.block_size() as u64,
            v[1].as_u64().unwrap(),
            "{name} block size"
        );
        assert_eq!(
            ty.type_size() as u64,
            v[2].as_u64().unwrap(),
            "{name} block bytes"
        );
    }
}

#[test]
fn file_is_shareable_across_threads() {
    // Loaders may decode tensors from several threads over one mapped file.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<GgufFile>();
    let f = open_fixture();
    std::thread::scope(|s| {
        let a = s.spawn(|| f.tensor_f32("q4_k").unwrap());
        let b = s.spawn(|| f.tensor_f32("q4_k").unwrap());
        assert_eq!(a.join().unwrap(), b.join().unwrap());
    });
}
