//! The SentencePiece (`tokenizer.ggml.model == "llama"`) path of the GGUF tokenizer against
//! SentencePiece itself and llama.cpp: a small BPE model with byte fallback, written to GGUF the
//! way convert_hf_to_gguf.py writes Llama vocabularies. Fixtures: make_spm_fixture.py,
//! llama_cpp_ids.py.

use std::path::PathBuf;

use rbee_engine::gguf::GgufFile;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

#[test]
fn sentencepiece_vocabulary_encodes_like_sentencepiece() {
    let f = GgufFile::open(fixtures().join("spm.gguf")).unwrap();
    let tok = f.tokenizer().unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("spm_tokens.json")).unwrap())
            .unwrap();
    let bos = reference["bos_id"].as_u64().unwrap() as u32;
    // llama.cpp's ids for the same texts (llama_cpp_ids.py) agree with SentencePiece's.
    let llama_cpp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("llama_cpp_ids.json")).unwrap())
            .unwrap();
    let llama_cpp = llama_cpp["spm"].as_array().unwrap();
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
        let got = tok.encode(text, false).unwrap().get_ids().to_vec();
        if got != want {
            let pieces = tok.encode(text, false).unwrap().get_tokens().to_vec();
            failures.push(format!(
                "{text:?}:\n  ours {got:?} {pieces:?}\n  spm  {want:?} {}",
                case["pieces"]
            ));
            continue;
        }
        // BOS is added for SentencePiece vocabularies (add_bos_token), as llama.cpp does.
        let with_bos = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(with_bos.first(), Some(&bos), "{text:?}");
        assert_eq!(&with_bos[1..], &want[..], "{text:?}");
        // Decoding undoes the `▁` escaping, the byte fallback and the space prefix.
        assert_eq!(
            tok.decode(&with_bos, true).unwrap(),
            text,
            "decode {text:?}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sentencepiece_control_tokens_are_single_ids() {
    let f = GgufFile::open(fixtures().join("spm.gguf")).unwrap();
    let tok = f.tokenizer().unwrap();
    let ids = tok.encode("<s>Hi</s>", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
}
