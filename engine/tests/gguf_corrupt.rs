//! Truncated, corrupted and hostile GGUF files give errors that name the file and the problem,
//! never a panic or a giant allocation.

use std::path::PathBuf;

use rbee_engine::gguf::{GgufError, GgufFile};

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tensors.gguf"),
    )
    .unwrap()
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes("bad.gguf", bytes)
}

/// A minimal GGUF v3 image built by hand, so tests can place exact bad values.
struct Builder {
    kvs: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        Self {
            kvs: Vec::new(),
            n_kv: 0,
            infos: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }

    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    /// A key with a raw (type id, encoded value).
    fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kvs, key);
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend(value);
        self.n_kv += 1;
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn data(mut self, bytes: &[u8]) -> Self {
        self.data.extend(bytes);
        self
    }

    fn build(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(self.kvs);
        out.extend(self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(self.data);
        out
    }
}

fn expect_err(bytes: Vec<u8>, needles: &[&str]) -> String {
    let err = match parse(bytes) {
        Ok(_) => panic!("parsed a bad file; expected an error mentioning {needles:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("bad.gguf"),
        "error does not name the file: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not mention {n:?}");
    }
    err
}

#[test]
fn hand_built_file_parses() {
    // Sanity check of the builder: one F32 tensor of 8 values.
    let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let f = parse(
        Builder::new()
            .kv(
                "general.architecture",
                8,
                &[5, 0, 0, 0, 0, 0, 0, 0, b'l', b'l', b'a', b'm', b'a'],
            )
            .tensor("t", &[8], 0, 0)
            .data(&data)
            .build(),
    )
    .unwrap();
    assert_eq!(
        f.tensor_f32("t").unwrap().data,
        [0., 1., 2., 3., 4., 5., 6., 7.]
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = fixture_bytes();
    for len in 0..bytes.len() {
        match parse(bytes[..len].to_vec()) {
            Ok(_) => panic!("a file truncated to {len} of {} bytes parsed", bytes.len()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("bad.gguf"), "{msg}");
                assert!(
                    matches!(e, GgufError::Truncated { .. } | GgufError::BadMagic { .. }),
                    "truncated to {len}: unexpected error {msg}"
                );
            }
        }
    }
    assert!(parse(bytes).is_ok());
}

#[test]
fn bad_magic_and_versions() {
    let mut b = fixture_bytes();
    b[0..4].copy_from_slice(b"GGML");
    expect_err(b, &["not a GGUF file"]);

    for v in [0u32, 1, 4, 99] {
        let mut b = fixture_bytes();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        expect_err(b, &["unsupported GGUF version", &v.to_string()]);
    }
    let mut b = fixture_bytes();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect_err(b, &["big-endian"]);
}

#[test]
fn counts_larger_than_the_file_are_refused_before_allocating() {
    let mut b = fixture_bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // kv count
    expect_err(b, &["truncated", "metadata entries"]);

    let mut b = fixture_bytes();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()); // tensor count
    expect_err(b, &["truncated", "tensor infos"]);

    // A string claiming 2^60 bytes.
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend(b"abc");
    expect_err(
        Builder::new().kv("k", 8, &huge).build(),
        &["truncated", "`k`"],
    );

    // An array claiming 2^62 u32 elements.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend((1u64 << 62).to_le_bytes());
    expect_err(
        Builder::new().kv("arr", 9, &arr).build(),
        &["truncated", "arr"],
    );
}

#[test]
fn metadata_cannot_amplify_far_beyond_the_file_size() {
    // 3 M one-byte elements: a 3 MB file whose array, decoded one 32-byte `Value` per
    // element, took 96 MB; the reader may take at most the file's size plus 64 MiB.
    let count = 3_000_000u64;
    let mut arr = 0u32.to_le_bytes().to_vec(); // u8 elements
    arr.extend(count.to_le_bytes());
    arr.resize(arr.len() + count as usize, 7);
    expect_err(
        Builder::new().kv("bytes", 9, &arr).build(),
        &["elements of metadata `bytes`", "bytes of memory"],
    );

    // Many small arrays add up the same way: each passes the per-array checks.
    let mut builder = Builder::new();
    for i in 0..40 {
        let count = 100_000u64;
        let mut arr = 7u32.to_le_bytes().to_vec(); // bool elements
        arr.extend(count.to_le_bytes());
        arr.resize(arr.len() + count as usize, 1);
        builder = builder.kv(&format!("a{i}"), 9, &arr);
    }
    expect_err(builder.build(), &["bytes of memory"]);

    // Tensor infos too: 900k scalar tensors (31 bytes each in the file, ~110 decoded with
    // their index entry) used to parse into ~100 MB from a 28 MB file.
    let mut builder = Builder::new();
    for i in 0..900_000 {
        builder = builder.tensor(&format!("t{i:06}"), &[], 0, 0);
    }
    expect_err(
        builder.data(&[0; 32]).build(),
        &["tensor infos", "bytes of memory"],
    );

    // A real vocabulary's worth of metadata (49152 tokens with scores and types, as in
    // SmolLM2) is far inside the budget even without any tensor data.
    let n = 49_152u64;
    let mut tokens = 8u32.to_le_bytes().to_vec();
    tokens.extend(n.to_le_bytes());
    let mut scores = 6u32.to_le_bytes().to_vec();
    scores.extend(n.to_le_bytes());
    for i in 0..n {
        let token = format!("tok{i}");
        tokens.extend((token.len() as u64).to_le_bytes());
        tokens.extend(token.as_bytes());
        scores.extend((i as f32).to_le_bytes());
    }
    let f = parse(
        Builder::new()
            .kv("tokenizer.ggml.tokens", 9, &tokens)
            .kv("tokenizer.ggml.scores", 9, &scores)
            .build(),
    )
    .unwrap();
    assert_eq!(
        f.metadata()
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .len(),
        n as usize
    );
}

/// A SentencePiece ("llama") vocabulary of `tokens`, with scores and no merges, so the
/// tokenizer derives its merges from the scores.
fn spm_vocabulary(tokens: &[String]) -> Vec<u8> {
    let mut model = Vec::new();
    Builder::string(&mut model, "llama");
    let mut array = 8u32.to_le_bytes().to_vec();
    array.extend((tokens.len() as u64).to_le_bytes());
    let mut scores = 6u32.to_le_bytes().to_vec();
    scores.extend((tokens.len() as u64).to_le_bytes());
    for (i, token) in tokens.iter().enumerate() {
        Builder::string(&mut array, token);
        scores.extend((-(i as f32)).to_le_bytes());
    }
    Builder::new()
        .kv("tokenizer.ggml.model", 8, &model)
        .kv("tokenizer.ggml.tokens", 9, &array)
        .kv("tokenizer.ggml.scores", 9, &scores)
        .build()
}

#[test]
fn merges_derived_from_scores_cannot_amplify() {
    // Families "x", "xx", ... "x"×128 for 60 letters: a 0.6 MB file whose every token splits
    // into two others at every position, which derived ~80 MB of merges (n³/3 bytes per
    // family, and as much work hashing the halves).
    let letters = ('a'..='z').chain('A'..='Z').chain('0'..='7');
    let tokens: Vec<String> = letters
        .flat_map(|c| (1..=128).map(move |n| c.to_string().repeat(n)))
        .collect();
    let file = parse(spm_vocabulary(&tokens)).unwrap();
    let err = file.tokenizer().unwrap_err().to_string();
    assert!(
        err.contains("bad.gguf") && err.contains("merges derived"),
        "{err}"
    );

    // A token far longer than any SentencePiece piece is refused outright.
    let tokens = vec!["a".to_string(), "a".repeat(200)];
    let err = parse(spm_vocabulary(&tokens))
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(err.contains("token 1 is 200 characters long"), "{err}");

    // An ordinary vocabulary still builds.
    let tokens: Vec<String> = ["a", "b", "ab", "ba", "abab"].map(String::from).to_vec();
    let tokenizer = parse(spm_vocabulary(&tokens)).unwrap().tokenizer().unwrap();
    assert_eq!(tokenizer.get_vocab_size(false), 5);
}

#[test]
fn malformed_values() {
    expect_err(
        Builder::new().kv("k", 13, &[0; 8]).build(),
        &["unknown value type 13"],
    );
    expect_err(Builder::new().kv("b", 7, &[2]).build(), &["invalid bool"]);
    let mut arr = 77u32.to_le_bytes().to_vec();
    arr.extend(1u64.to_le_bytes());
    expect_err(
        Builder::new().kv("arr", 9, &arr).build(),
        &["array of unknown value type 77"],
    );
    // Arrays nested deeper than any real file uses.
    let mut nested = Vec::new();
    for _ in 0..64 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    expect_err(
        Builder::new().kv("deep", 9, &nested).build(),
        &["nested too deeply"],
    );
    expect_err(
        Builder::new()
            .kv("dup", 4, &1u32.to_le_bytes())
            .kv("dup", 4, &2u32.to_le_bytes())
            .build(),
        &["duplicate metadata key `dup`"],
    );
    expect_err(
        Builder::new()
            .kv("general.alignment", 4, &24u32.to_le_bytes())
            .build(),
        &["general.alignment"],
    );
}

#[test]
fn bad_tensor_infos() {
    let f32x8 = [0u8; 32];
    expect_err(
        Builder::new().tensor("t", &[8], 5, 0).data(&f32x8).build(),
        &["`t`", "unknown ggml type id 5"],
    );
    expect_err(
        Builder::new().tensor("t", &[8], 0, 64).data(&f32x8).build(),
        &["truncated", "tensor `t`"],
    );
    expect_err(
        Builder::new().tensor("t", &[8], 0, 4).data(&f32x8).build(),
        &["`t`", "not a multiple of the alignment"],
    );
    expect_err(
        Builder::new().tensor("t", &[1, 2, 3, 4, 5], 0, 0).build(),
        &["`t`", "5 dimensions"],
    );
    expect_err(
        Builder::new().tensor("t", &[u64::MAX / 2, 4], 0, 0).build(),
        &["`t`", "overflow"],
    );
    // Q8_0 rows must be whole 32-element blocks.
    expect_err(
        Builder::new()
            .tensor("q", &[40], 8, 0)
            .data(&[0; 64])
            .build(),
        &["`q`", "not a multiple of the Q8_0 block size 32"],
    );
    expect_err(
        Builder::new()
            .tensor("t", &[8], 0, 0)
            .tensor("t", &[8], 0, 32)
            .data(&[0; 64])
            .build(),
        &["duplicate tensor name `t`"],
    );
    // Offsets near u64::MAX must not wrap around into the file.
    expect_err(
        Builder::new()
            .tensor("t", &[8], 0, u64::MAX - 31)
            .data(&f32x8)
            .build(),
        &["truncated", "`t`"],
    );
}

#[test]
fn unsupported_tensor_type_fails_only_when_dequantized() {
    // IQ2_XXS (16): parses, its raw bytes are available, expanding it is a clear error.
    let f = parse(
        Builder::new()
            .tensor("iq", &[256], 16, 0)
            .data(&[0; 66])
            .build(),
    )
    .unwrap();
    assert_eq!(f.raw_tensor("iq").unwrap().data.len(), 66);
    let err = f.tensor_f32("iq").unwrap_err().to_string();
    assert!(err.contains("IQ2_XXS") && err.contains("`iq`"), "{err}");
}

#[test]
fn random_corruption_never_panics() {
    // Deterministic xorshift so failures reproduce.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let original = fixture_bytes();
    // The header (metadata + tensor infos) ends where the data begins.
    let header_len = GgufFile::from_bytes("ok.gguf", original.clone())
        .unwrap()
        .data_offset() as usize;
    for _ in 0..3000 {
        let mut b = original.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_len;
            b[at] = next() as u8;
        }
        if let Ok(f) = parse(b) {
            // Whatever parsed must also be safe to read.
            let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
            for n in names {
                let _ = f.tensor_f32(&n);
            }
            let _ = f.model_config();
            let _ = f.tokenizer();
        }
    }
}
