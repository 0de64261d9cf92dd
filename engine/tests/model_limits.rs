//! Model files from strangers: a GGUF or `config.json` that declares an absurd shape, and a
//! shard index that points outside the model folder, are load errors that say what is wrong,
//! never an abort, an allocation of the declared size, or a file read from elsewhere.

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, scratch};
use rbee_engine::gguf::{GgufFile, Value};
use rbee_engine::{DeviceChoice, Engine, LoadOptions, WeightFormat};

fn try_load(path: &Path) -> Result<(), String> {
    Engine::load(
        path,
        &LoadOptions {
            device: DeviceChoice::Cpu,
            weights: WeightFormat::Auto,
            ..LoadOptions::default()
        },
    )
    .map(drop)
    .map_err(|e| e.to_string())
}

fn expect_load_error(path: &Path, needles: &[&str]) {
    let err = match try_load(path) {
        Ok(()) => panic!(
            "{} loaded; expected an error mentioning {needles:?}",
            path.display()
        ),
        Err(err) => err,
    };
    for needle in needles {
        assert!(
            err.contains(needle),
            "error {err:?} does not mention {needle:?}"
        );
    }
}

/// GGUF encoding of a metadata value (type id, then the value).
fn encode(out: &mut Vec<u8>, value: &Value) {
    use rbee_engine::gguf::ValueType;
    let type_id = |t: ValueType| -> u32 {
        [
            ValueType::U8,
            ValueType::I8,
            ValueType::U16,
            ValueType::I16,
            ValueType::U32,
            ValueType::I32,
            ValueType::F32,
            ValueType::Bool,
            ValueType::String,
            ValueType::Array,
            ValueType::U64,
            ValueType::I64,
            ValueType::F64,
        ]
        .iter()
        .position(|&x| x == t)
        .unwrap() as u32
    };
    fn body(
        out: &mut Vec<u8>,
        value: &Value,
        type_id: &dyn Fn(rbee_engine::gguf::ValueType) -> u32,
    ) {
        match value {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.push(*v as u8),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            Value::Array(t, items) => {
                out.extend(type_id(*t).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    body(out, item, type_id);
                }
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
    out.extend(type_id(value.value_type()).to_le_bytes());
    body(out, value, &type_id);
}

/// `tiny-llama.gguf` written again with `edits` (a key set to a value, added if absent), into
/// a scratch file.
fn edited_gguf(name: &str, edits: &[(&str, Value)]) -> PathBuf {
    let source = GgufFile::open(fixtures().join("tiny-llama.gguf")).unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    let mut entries: Vec<(String, Value)> = source
        .metadata()
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    for (key, value) in edits {
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.clone(),
            None => entries.push((key.to_string(), value.clone())),
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((source.tensors().len() as u64).to_le_bytes());
    out.extend((entries.len() as u64).to_le_bytes());
    for (key, value) in &entries {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        encode(&mut out, value);
    }
    for info in source.tensors() {
        out.extend((info.name.len() as u64).to_le_bytes());
        out.extend(info.name.as_bytes());
        out.extend((info.dims.len() as u32).to_le_bytes());
        for d in &info.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(info.ggml_type.id().to_le_bytes());
        out.extend(info.offset.to_le_bytes());
    }
    let alignment = source.alignment() as usize;
    while !out.len().is_multiple_of(alignment) {
        out.push(0);
    }
    out.extend(&bytes[source.data_offset() as usize..]);
    let path = scratch(name).join("model.gguf");
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn the_unedited_copy_loads() {
    // The rewriter itself is faithful: with no edits the model loads as the original does.
    try_load(&edited_gguf("unedited", &[])).unwrap();
}

#[test]
fn an_absurd_gguf_context_length_is_a_load_error() {
    // Loaded before: 4 billion positions went into the KV budget and (truncated) into /info.
    let path = edited_gguf("context", &[("llama.context_length", Value::U32(u32::MAX))]);
    expect_load_error(&path, &["context length 4294967295", "model.gguf"]);
    // Under the absolute cap, but 2^20 positions × 16 head dims outweigh this model's ~100k
    // weights (its f32 position tables alone would take 128 MB).
    let path = edited_gguf(
        "context-tables",
        &[("llama.context_length", Value::U32(1 << 20))],
    );
    expect_load_error(
        &path,
        &["context length 1048576 × head dim 16", "outweigh the model"],
    );
}

#[test]
fn an_absurd_gguf_layer_head_or_vocab_count_is_a_load_error() {
    // 4 billion layers used to be a `Vec::with_capacity` of 4 billion layers: an abort.
    for (name, key, value) in [
        ("layers", "llama.block_count", Value::U32(u32::MAX)),
        ("heads", "llama.attention.head_count", Value::U32(1 << 20)),
        ("vocab", "llama.vocab_size", Value::U64(1 << 22)),
        ("ffn", "llama.feed_forward_length", Value::U64(1 << 40)),
    ] {
        let mut edits = vec![(key, value)];
        if name == "heads" {
            // Keeps the head dimension what it was, so only the count is absurd.
            edits.push(("llama.attention.key_length", Value::U32(16)));
            edits.push(("llama.attention.head_count_kv", Value::U32(1 << 20)));
        }
        let path = edited_gguf(name, &edits);
        expect_load_error(&path, &["implies more weights than the checkpoint holds"]);
    }
    let path = edited_gguf("huge-vocab", &[("llama.vocab_size", Value::U64(1 << 40))]);
    expect_load_error(&path, &["vocabulary size 1099511627776"]);
}

/// A copy of the tiny-llama folder whose weights are found through `index` (its
/// `model.safetensors` removed), and the parent folder it was made in.
fn sharded_folder(name: &str, weight_file: &str) -> (PathBuf, PathBuf) {
    let parent = scratch(name);
    let dir = parent.join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": { "model.embed_tokens.weight": weight_file },
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    (parent, dir)
}

#[test]
fn a_shard_index_cannot_point_outside_the_model_folder() {
    let weights = fixtures().join("tiny-llama/model.safetensors");
    // The same weights one folder up: they loaded from there before.
    let (parent, dir) = sharded_folder("outside", "../weights.safetensors");
    std::fs::copy(&weights, parent.join("weights.safetensors")).unwrap();
    expect_load_error(
        &dir,
        &["weight_map", "../weights.safetensors", "not a file inside"],
    );

    let absolute = weights.to_str().unwrap().to_string();
    let (_, dir) = sharded_folder("absolute", &absolute);
    expect_load_error(&dir, &["weight_map", "not a file inside"]);

    // A shard inside the folder still loads.
    let (_, dir) = sharded_folder("inside", "shard-1.safetensors");
    std::fs::copy(&weights, dir.join("shard-1.safetensors")).unwrap();
    try_load(&dir).unwrap();
}

#[test]
fn an_absurd_config_json_is_a_load_error() {
    for (name, key, value, needle) in [
        (
            "ctx",
            "max_position_embeddings",
            1u64 << 30,
            "context length 1073741824",
        ),
        (
            "vocab",
            "vocab_size",
            1 << 40,
            "vocabulary size 1099511627776",
        ),
        (
            "hf-layers",
            "num_hidden_layers",
            1 << 20,
            "implies more weights",
        ),
        (
            "hf-ffn",
            "intermediate_size",
            1 << 30,
            "implies more weights",
        ),
    ] {
        let dir = scratch(name);
        for entry in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        config[key] = value.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        expect_load_error(&dir, &[needle, "config.json"]);
    }
}
