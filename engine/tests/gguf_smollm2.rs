//! The reader on a real model: SmolLM2-135M-Instruct Q4_1 (`scripts/fetch-model.sh`). Every
//! tensor must dequantize bit-identically to llama.cpp's `gguf` package, and the tokenizer must
//! produce the ids of SmolLM2's upstream tokenizer pipeline and of llama.cpp (which agree on all
//! 137 strings). The tests are ignored (cargo lists them so) unless asked for with
//! `--include-ignored`, which scripts/test.sh does when the model is there; run without the
//! model, they fail saying how to get it.
//! References: tests/fixtures/gguf/make_smollm2_reference.py.

use std::path::PathBuf;
use std::time::Instant;

use rbee_engine::gguf::{GgmlType, GgufFile, gguf_to_hf};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> GgufFile {
    let path = manifest().join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is absent: run scripts/fetch-model.sh",
        path.display()
    );
    GgufFile::open(&path).expect("SmolLM2 GGUF opens")
}

fn fixture(name: &str) -> serde_json::Value {
    let path = manifest().join("tests/fixtures/gguf").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// sum(bits[i] * (2i + 1)) mod 2^64, as in make_smollm2_reference.py.
fn checksum(values: &[f32]) -> u64 {
    values.iter().enumerate().fold(0u64, |acc, (i, v)| {
        acc.wrapping_add(u64::from(v.to_bits()).wrapping_mul(2 * i as u64 + 1))
    })
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn metadata_and_config() {
    let f = model();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    let cfg = f.model_config().unwrap();
    assert_eq!(cfg.architecture, "llama");
    assert_eq!(cfg.context_length, 8192);
    assert_eq!(cfg.embedding_length, 576);
    assert_eq!(cfg.block_count, 30);
    assert_eq!(cfg.feed_forward_length, 1536);
    assert_eq!(cfg.head_count, 9);
    assert_eq!(cfg.head_count_kv, 3);
    assert_eq!(cfg.head_dim(), 64);
    assert_eq!(cfg.rope_freq_base, 100_000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.rope_dimension_count, Some(64));
    assert!(
        cfg.tie_word_embeddings,
        "SmolLM2 ties lm_head to the embeddings"
    );
    assert!(cfg.qk_permuted);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_id, Some(2));
    assert_eq!(cfg.eot_token_id, None);
    // <|endoftext|> (0) and <|im_end|> (2) both end generation.
    assert_eq!(cfg.eog_token_ids, [0, 2]);
    assert!(!cfg.add_bos_token);
    assert!(
        cfg.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );
    // Every tensor has an HF name, so the loader can treat the file like an HF checkpoint.
    for t in f.tensors() {
        assert!(gguf_to_hf(&t.name).is_some(), "{} has no HF name", t.name);
    }
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn every_tensor_matches_gguf_py_bit_for_bit() {
    let f = model();
    let reference = fixture("smollm2_tensors.json");
    let expected = reference["tensors"].as_array().unwrap();
    assert_eq!(expected.len(), f.tensors().len());

    // One tensor at a time (the whole model in f32 is 540 MB); only decoding is timed.
    let mut decoding = std::time::Duration::ZERO;
    let mut elements = 0usize;
    for (info, want) in f.tensors().iter().zip(expected) {
        let started = Instant::now();
        let out = f.tensor_f32(&info.name).unwrap();
        decoding += started.elapsed();
        elements += out.data.len();

        assert_eq!(info.name, want["name"].as_str().unwrap());
        assert_eq!(info.ggml_type.to_string(), want["type"].as_str().unwrap());
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(out.shape, shape, "{}", info.name);
        if let Some(samples) = want.get("samples") {
            for s in samples.as_array().unwrap() {
                let i = s[0].as_u64().unwrap() as usize;
                let v = s[1].as_f64().unwrap() as f32;
                assert_eq!(out.data[i], v, "{}[{i}]", info.name);
            }
        }
        let sum: u64 = want["checksum"].as_str().unwrap().parse().unwrap();
        assert_eq!(checksum(&out.data), sum, "{}: checksum", info.name);
    }
    eprintln!(
        "dequantized {} tensors, {:.1} M values, in {:.0} ms ({:.0} M values/s, allocation included)",
        f.tensors().len(),
        elements as f64 / 1e6,
        decoding.as_secs_f64() * 1e3,
        elements as f64 / 1e6 / decoding.as_secs_f64()
    );
    let types: std::collections::HashSet<_> = f.tensors().iter().map(|t| t.ggml_type).collect();
    assert!(types.contains(&GgmlType::Q4_1) && types.contains(&GgmlType::Q8_0));
}

#[test]
#[ignore = "needs SmolLM2 (scripts/fetch-model.sh; scripts/test.sh then runs it)"]
fn tokenizer_matches_the_references() {
    let f = model();
    let started = Instant::now();
    let tok = f.tokenizer().unwrap();
    eprintln!(
        "tokenizer built in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(tok.get_vocab_size(true), 49152);

    let reference = fixture("smollm2_tokens.json");
    // llama.cpp's ids for the same texts (llama_cpp_ids.py): the two references agree.
    let llama_cpp = fixture("llama_cpp_ids.json");
    let llama_cpp = llama_cpp["smollm2"].as_array().unwrap();
    assert_eq!(
        llama_cpp.len(),
        reference["cases"].as_array().unwrap().len()
    );
    let mut failures = Vec::new();
    for (case, llama) in reference["cases"].as_array().unwrap().iter().zip(llama_cpp) {
        assert_eq!(case["text"], llama["text"]);
        assert_eq!(
            case["ids"], llama["ids"],
            "the references disagree on {}",
            case["text"]
        );
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        if got != want {
            failures.push(format!("{text:?}:\n  ours  {got:?}\n  ref   {want:?}"));
        }
        // Byte-level BPE is lossless: decoding gives the text back, special tokens included.
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            text,
            "decode of {text:?}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Chat markup: each special token is a single id.
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "user\nHi",
        "skip_special_tokens drops the markup"
    );
}
