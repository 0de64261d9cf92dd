//! Loading a Hugging Face model folder: `config.json`, `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`), `tokenizer.json`, and the optional
//! `tokenizer_config.json` / `generation_config.json`.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::checkpoint::{Checkpoint, Format, SpecialTokens, load_error};
use super::limits::{Stored, check_config_fits};
use super::plan::{WeightPlan, finish_burn_model};
use super::progress::Progress;
use crate::device::Selected;
use crate::model::ModelConfig;
use crate::model::burn::BurnModel;
use crate::model::config::HfConfig;

/// A model folder whose `config.json` and safetensors headers are read and checked: the
/// model's shape, which the weight plan is chosen from before any weight is read.
pub struct Header {
    dir: PathBuf,
    pub config: ModelConfig,
    /// `config.json` as written, for the special tokens it may name.
    raw_config: Value,
    shards: Vec<PathBuf>,
    /// How many tensors the config implies.
    expected: usize,
}

impl Header {
    /// Reads the folder `dir`'s config and every shard's header: they name the tensors (tied
    /// or untied output?) and catch truncated files and a config the files cannot back with
    /// a clear message before anything is allocated.
    pub fn read(dir: &Path) -> Result<Self, crate::EngineError> {
        let config_path = dir.join("config.json");
        let config_text = fs::read_to_string(&config_path)
            .map_err(|e| load_error(&config_path, format!("cannot read: {e}")))?;
        let hf: HfConfig = serde_json::from_str(&config_text)
            .map_err(|e| load_error(&config_path, format!("invalid config: {e}")))?;
        let raw_config: Value = serde_json::from_str(&config_text).unwrap_or(Value::Null);
        let mut config = hf
            .into_model_config()
            .map_err(|e| load_error(&config_path, e))?;

        let shards = shard_files(dir)?;
        let mut names = BTreeSet::new();
        let mut elements = 0u64;
        for shard in &shards {
            let header = safetensors_header(shard)?;
            names.extend(header.names);
            elements = elements.saturating_add(header.elements);
        }
        config.tie_word_embeddings = !names.contains("lm_head.weight");
        let stored = Stored {
            tensors: names.len() as u64,
            elements,
        };
        check_config_fits(&config, stored).map_err(|e| load_error(&config_path, e))?;

        let expected: BTreeSet<String> = expected_tensors(&config).into_iter().collect();
        if let Some(missing) = expected.iter().find(|n| !names.contains(*n)) {
            return Err(load_error(
                &shards[0],
                format!("tensor `{missing}` is missing from the checkpoint"),
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
            config,
            raw_config,
            shards,
            expected: expected.len(),
        })
    }

    /// Loads the folder onto `device` in `plan`'s form: through Burn's safetensors store
    /// into Burn's layers (f32), then into the plan's form.
    pub fn load(
        self,
        plan: WeightPlan,
        device: &Selected,
    ) -> Result<Checkpoint, crate::EngineError> {
        let Header {
            dir,
            config,
            raw_config,
            shards,
            expected,
        } = self;
        let mut model = BurnModel::new(&config, &device.device);
        let progress = Progress::new("loading safetensors", shards.len() as u64);
        let mut applied = HashSet::new();
        for shard in &shards {
            // Every float tensor widened to f32 as it is read, whatever the file holds: most
            // checkpoints are bf16, which no wgpu shader takes (loaded as it is, every kernel
            // of the model failed on the device), and the plan's form starts from f32.
            let mut store = SafetensorsStore::from_file(shard)
                .with_from_adapter(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32)))
                .allow_partial(true)
                .validate(true);
            let result = model
                .load_from(&mut store)
                .map_err(|e| load_error(shard, e.to_string()))?;
            if !result.errors.is_empty() {
                return Err(load_error(shard, format!("{:?}", result.errors)));
            }
            applied.extend(result.applied);
            progress.inc(1);
        }
        progress.finish();
        // `applied` holds Burn's paths (norm weights are `gamma` there).
        tracing::debug!(tensors = applied.len(), "weights applied");
        if applied.len() < expected {
            return Err(load_error(
                &dir,
                format!(
                    "only {} of {expected} tensors matched the model",
                    applied.len(),
                ),
            ));
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| load_error(&tokenizer_path, format!("invalid tokenizer: {e}")))?;

        let special = special_tokens(&dir, &raw_config, &tokenizer)?;
        let model = finish_burn_model(model, &config, plan, &device.device)
            .map_err(|e| load_error(&dir, e))?;
        Ok(Checkpoint {
            config,
            model,
            tokenizer,
            special,
            id: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            format: Format::HfFolder,
            device_name: device.name.clone(),
        })
    }
}

/// The safetensors files of the checkpoint, from the index when the model is sharded.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, crate::EngineError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(load_error(
            dir,
            "no model.safetensors or model.safetensors.index.json in the folder".into(),
        ));
    }
    let index: Value = fs::read_to_string(&index_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        .map_err(|e| load_error(&index_path, format!("invalid index: {e}")))?;
    let files: BTreeSet<String> = index["weight_map"]
        .as_object()
        .ok_or_else(|| load_error(&index_path, "no weight_map".into()))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files
        .into_iter()
        .map(|file| {
            shard_path(dir, &file).ok_or_else(|| {
                load_error(
                    &index_path,
                    format!(
                        "weight_map names `{file}`, which is not a file inside the model folder"
                    ),
                )
            })
        })
        .collect()
}

/// `dir/name` when `name` is a relative path that stays inside `dir` (only plain
/// components: no `..`, no root, no Windows prefix), as shard names are: a model from a
/// stranger must not make the loader open `../../etc/…` or `/dev/zero`. Symbolic links in
/// the folder are still followed, as the Hugging Face cache (snapshots linking to blobs)
/// needs.
fn shard_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let relative = Path::new(name);
    let plain = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && !name.is_empty()).then(|| dir.join(relative))
}

/// What a safetensors header declares.
struct SafetensorsHeader {
    names: Vec<String>,
    /// Elements of every tensor together.
    elements: u64,
}

/// Tensor names and sizes in a safetensors file, after checking that the header is sound and
/// that the file is long enough for every tensor it declares.
fn safetensors_header(path: &Path) -> Result<SafetensorsHeader, crate::EngineError> {
    let err = |reason: String| load_error(path, reason);
    let mut file = fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| err("file too short for a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 || 8 + header_len > file_len {
        return Err(err(format!(
            "truncated or not safetensors: header of {header_len} bytes in a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read header: {e}")))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| err(format!("invalid header: {e}")))?;
    let mut end = 0u64;
    let mut names = Vec::new();
    let mut elements = 0u64;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info["data_offsets"].as_array();
        let offset = |i: usize| offsets.and_then(|o| o.get(i)).and_then(Value::as_u64);
        if let Some(stop) = offset(1) {
            end = end.max(stop);
        }
        // Counted only as far as the tensor's bytes back it (no dtype is smaller than half
        // a byte), so a header cannot declare shapes its data does not hold.
        let bytes = offset(1)
            .unwrap_or(0)
            .saturating_sub(offset(0).unwrap_or(0));
        let count = info["shape"]
            .as_array()
            .and_then(|shape| {
                shape
                    .iter()
                    .try_fold(1u64, |n, d| n.checked_mul(d.as_u64()?))
            })
            .unwrap_or(0);
        elements = elements.saturating_add(count.min(bytes.saturating_mul(2)));
        names.push(name);
    }
    let data_len = file_len - 8 - header_len;
    if end > data_len {
        return Err(err(format!(
            "truncated: tensors need {end} bytes of data, the file has {data_len}"
        )));
    }
    Ok(SafetensorsHeader { names, elements })
}

/// HF names of every tensor the model needs.
pub fn expected_tensors(config: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".into(),
        "model.norm.weight".into(),
    ];
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..config.num_layers {
        let p = format!("model.layers.{i}.");
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("{p}{n}"));
        }
        if config.attention_bias {
            for n in [
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
            ] {
                names.push(format!("{p}{n}"));
            }
        }
    }
    names
}

/// bos/eos strings and ids and the chat template, from `tokenizer_config.json`,
/// `generation_config.json` and `config.json`, whichever say something.
fn special_tokens(
    dir: &Path,
    config: &Value,
    tokenizer: &Tokenizer,
) -> Result<SpecialTokens, crate::EngineError> {
    let read_json = |name: &str| -> Result<Value, crate::EngineError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(Value::Null);
        }
        let text = fs::read_to_string(&path)
            .map_err(|e| load_error(&path, format!("cannot read: {e}")))?;
        serde_json::from_str(&text).map_err(|e| load_error(&path, format!("invalid JSON: {e}")))
    };
    let tok_config = read_json("tokenizer_config.json")?;
    let gen_config = read_json("generation_config.json")?;

    // A token is written either as a string or as `{"content": "..."}`.
    let token_string = |v: &Value| -> Option<String> {
        v.as_str()
            .map(str::to_owned)
            .or_else(|| v["content"].as_str().map(str::to_owned))
    };
    let ids = |v: &Value| -> Vec<u32> {
        match v {
            Value::Number(n) => n.as_u64().map(|n| n as u32).into_iter().collect(),
            Value::Array(a) => a
                .iter()
                .filter_map(|n| n.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        }
    };

    let mut eos_ids = ids(&gen_config["eos_token_id"]);
    eos_ids.extend(ids(&config["eos_token_id"]));
    let eos_string = token_string(&tok_config["eos_token"]);
    if let Some(s) = &eos_string
        && let Some(id) = tokenizer.token_to_id(s)
    {
        eos_ids.push(id);
    }
    let mut seen = HashSet::new();
    eos_ids.retain(|id| seen.insert(*id));

    let bos_token = token_string(&tok_config["bos_token"]).or_else(|| {
        let mut bos = ids(&gen_config["bos_token_id"]);
        bos.extend(ids(&config["bos_token_id"]));
        bos.first().and_then(|&id| tokenizer.id_to_token(id))
    });
    let chat_template = match &tok_config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        // Newer configs list named templates; the default one is what a chat client wants.
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or(list.first())
            .and_then(|t| t["template"].as_str().map(str::to_owned)),
        _ => None,
    };
    Ok(SpecialTokens {
        bos_token,
        eos_ids,
        chat_template,
    })
}
