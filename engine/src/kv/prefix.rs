//! The hash chain that names a full block by everything before it: a block's hash covers its
//! parent's hash and its own content, so two sequences' blocks are equal exactly when their
//! tokens agree from the first position to the block's end, and each position was computed
//! the same way (the model may compute a row by one of two kernels, whose numbers differ in
//! the last bits: a block is reused only where it holds the very numbers the sequence would
//! compute itself). The chain's root names the model and its weight format, so KV of one
//! model is never taken for another's.

use std::hash::{DefaultHasher, Hash, Hasher};

/// What a full block holds: its tokens, and which of its positions were computed by the
/// model's row kernel (bit `i` for position `i` of the block).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockContent<'a> {
    pub tokens: &'a [u32],
    pub row_kernel: u32,
}

/// A full block's identity: its prefix's content, through the block's last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BlockHash(u64);

impl BlockHash {
    /// The chain's root, for a model (its path or name) in a weight format.
    pub fn root(model: &str) -> Self {
        let mut hasher = DefaultHasher::new();
        "rbee-kv-root".hash(&mut hasher);
        model.hash(&mut hasher);
        Self(hasher.finish())
    }

    /// The hash of a block holding `content` after the prefix `self` names.
    pub fn child(self, content: BlockContent<'_>) -> Self {
        let mut hasher = DefaultHasher::new();
        self.0.hash(&mut hasher);
        content.tokens.hash(&mut hasher);
        content.row_kernel.hash(&mut hasher);
        Self(hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_covers_the_model_and_every_earlier_token() {
        let block = |tokens| BlockContent {
            tokens,
            row_kernel: 0,
        };
        let root = BlockHash::root("SmolLM2 q4_1");
        let a = root.child(block(&[1, 2, 3]));
        assert_eq!(a, BlockHash::root("SmolLM2 q4_1").child(block(&[1, 2, 3])));
        assert_ne!(a, BlockHash::root("SmolLM2 f32").child(block(&[1, 2, 3])));
        assert_ne!(
            a.child(block(&[4])),
            root.child(block(&[9, 2, 3])).child(block(&[4]))
        );
        let other_kernel = BlockContent {
            tokens: &[1, 2, 3],
            row_kernel: 0b10,
        };
        assert_ne!(a, root.child(other_kernel));
    }
}
