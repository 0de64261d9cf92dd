//! Where the CPU model's weights come from: the source a checkpoint reader implements, and
//! the token embedding table in the form the checkpoint stored it.

use std::sync::Arc;

use crate::quant::BlockMatrix;

/// Where the CPU model's weights come from, by Hugging Face tensor name: a checkpoint
/// reader hands over blocks as stored where it can (a GGUF's Q4_1/Q8_0) and requantizes the
/// rest.
pub trait CpuWeights {
    /// A `[rows, cols]` matrix in blocks.
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<BlockMatrix, String>;
    /// A vector of `len` values (a norm weight or a bias).
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String>;
    /// The token embedding table `[vocab, hidden]` as the checkpoint stores it.
    fn embeddings(&mut self, vocab: usize, hidden: usize) -> Result<Embeddings, String>;
}

/// The token embedding table.
#[derive(Debug)]
pub enum Embeddings {
    /// Stored in blocks: rows are expanded on lookup, and a tied output head multiplies
    /// the same blocks (no f32 copy of the largest matrix: 113 MB for SmolLM2).
    Blocks(Arc<BlockMatrix>),
    /// f32 rows `[vocab, hidden]`, for checkpoints whose table is not in blocks.
    F32 { table: Vec<f32>, hidden: usize },
}

impl Embeddings {
    /// Rows `ids`, `[ids.len(), hidden]`.
    pub(super) fn lookup(&self, ids: &[u32]) -> Vec<f32> {
        let hidden = match self {
            Embeddings::Blocks(table) => table.cols(),
            Embeddings::F32 { hidden, .. } => *hidden,
        };
        let mut x = vec![0f32; ids.len() * hidden];
        for (&id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
            let id = id as usize;
            match self {
                Embeddings::Blocks(table) => table.expand_row(id, row),
                Embeddings::F32 { table, .. } => {
                    row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
                }
            }
        }
        x
    }

    /// The table as the output head's blocks: the same blocks, or the f32 rows quantized.
    pub(super) fn as_head(&self) -> Result<Arc<BlockMatrix>, String> {
        match self {
            Embeddings::Blocks(table) => Ok(table.clone()),
            Embeddings::F32 { table, hidden } => {
                BlockMatrix::quantize(table, table.len() / hidden, *hidden)
                    .map(Arc::new)
                    .ok_or_else(|| "the embedding table is not whole blocks".into())
            }
        }
    }
}
