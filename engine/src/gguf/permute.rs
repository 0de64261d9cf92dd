//! Undoing llama.cpp's q/k row permutation.
//!
//! Hugging Face Llama checkpoints apply rotary embeddings "rotate-half" style: within a head of
//! `hd` rows, row `i` is paired with row `i + hd/2`. ggml's rope pairs *adjacent* rows (`2i`,
//! `2i+1`), so `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders the rows of `q_proj` and
//! `k_proj` (weights and biases) when writing a GGUF:
//!
//! ```text
//! w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
//! ```
//!
//! with `n_head = head_count` for q and `head_count_kv` for k. An engine that implements HF's
//! rotate-half rope (as ours does, so HF and GGUF checkpoints share one code path) must undo it.
//!
//! It applies to GGUF files whose `general.architecture` is `llama` (Llama 1/2/3, Mistral,
//! SmolLM, TinyLlama are all written by `LlamaModel`); see [`needs_qk_unpermute`]. Qwen2 and
//! most other architectures are written unpermuted because ggml runs them with NEOX-style
//! (rotate-half) rope already.

/// Whether q/k weights of a GGUF with this `general.architecture` are stored permuted.
pub fn needs_qk_unpermute(architecture: &str) -> bool {
    // The Llama family this engine runs. (A few other converters derived from `LlamaModel`,
    // e.g. granite, permute too; they are not Llama-shaped enough for this engine anyway.)
    architecture == "llama"
}

/// Restores Hugging Face row order for a q or k projection in place.
///
/// `data` is row-major `[rows, cols]` (`rows = n_head * head_dim`; use `cols = 1` for a bias);
/// `n_head` is `attention.head_count` for q and `attention.head_count_kv` for k.
/// Works for any element type, so it can also reorder rows of raw quantized bytes when `cols`
/// is the number of bytes per row (blocks never straddle rows).
///
/// # Panics
/// If `data.len() != rows * cols` or `rows` is not a multiple of `2 * n_head`; these are
/// programming errors in the caller, which knows the tensor's shape.
pub fn unpermute_qk<T: Copy>(data: &mut [T], rows: usize, cols: usize, n_head: usize) {
    reorder_rows(data, rows, cols, n_head, false);
}

/// The forward permutation (HF → GGUF order), as `convert_hf_to_gguf.py` does it; the inverse
/// of [`unpermute_qk`]. Useful for tests and for writing GGUF files.
pub fn permute_qk<T: Copy>(data: &mut [T], rows: usize, cols: usize, n_head: usize) {
    reorder_rows(data, rows, cols, n_head, true);
}

fn reorder_rows<T: Copy>(data: &mut [T], rows: usize, cols: usize, n_head: usize, forward: bool) {
    assert_eq!(
        data.len(),
        rows * cols,
        "q/k permute: data is not rows*cols"
    );
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "q/k permute: {rows} rows cannot be split into {n_head} heads of even size"
    );
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let src = data.to_vec();
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                // HF row h*hd + j*half + i is stored as GGUF row h*hd + 2*i + j.
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                let (to, from) = if forward { (gguf, hf) } else { (hf, gguf) };
                data[to * cols..(to + 1) * cols]
                    .copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_convert_hf_to_gguf_on_one_head() {
        // One head of 4 rows, 1 col: HF rows [a0 a1 b0 b1] are stored as [a0 b0 a1 b1].
        let mut v = vec![0, 1, 2, 3];
        permute_qk(&mut v, 4, 1, 1);
        assert_eq!(v, [0, 2, 1, 3]);
        unpermute_qk(&mut v, 4, 1, 1);
        assert_eq!(v, [0, 1, 2, 3]);
    }

    #[test]
    fn round_trip_multi_head() {
        let orig: Vec<u32> = (0..(3 * 8 * 5)).collect();
        let mut v = orig.clone();
        permute_qk(&mut v, 24, 5, 3);
        assert_ne!(v, orig);
        unpermute_qk(&mut v, 24, 5, 3);
        assert_eq!(v, orig);
    }
}
