//! The pool of KV blocks: who holds each block (a reference count), which full blocks hold a
//! known prefix (a map from the prefix's hash), and which blocks can be handed out.
//!
//! A block is in one of three states:
//! - **held** by one or more sequences (a cached block can be held by several: their tokens
//!   agree through its end, and nobody writes a full block);
//! - **free**, holding nothing worth keeping;
//! - **cached and unheld**: free to reuse, but it still holds a prefix that a later request
//!   may hit. These are reused only when no free block is left, least recently released
//!   first (LRU), and stop being cached then.

use std::collections::{BTreeMap, HashMap};

use super::block::{BLOCK_SIZE, BlockId};
use super::prefix::{BlockContent, BlockHash};

#[derive(Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    /// Free blocks, the most recently released on top: memory that was written recently is
    /// reused first, and blocks never touched stay untouched (the store's pages are mapped
    /// lazily).
    free: Vec<BlockId>,
    /// Cached blocks that nobody holds, by the tick of their release: the first is the least
    /// recently used.
    unheld: BTreeMap<u64, BlockId>,
    /// Full blocks by the prefix they hold.
    cached: HashMap<BlockHash, BlockId>,
    /// Whether full blocks are kept for later requests at all (`--no-prefix-cache`, and
    /// model forms that cannot resume a sequence from a cached prefix).
    caching: bool,
    tick: u64,
}

#[derive(Debug, Default)]
struct Block {
    holders: u32,
    /// The prefix this block holds, when it is in `cached`.
    hash: Option<BlockHash>,
    /// Its key in `unheld`, while it is cached and nobody holds it.
    released: Option<u64>,
}

impl BlockPool {
    pub fn new(blocks: usize, caching: bool) -> Self {
        Self {
            blocks: (0..blocks).map(|_| Block::default()).collect(),
            // Reversed, so block 0 is handed out first.
            free: (0..blocks as BlockId).rev().collect(),
            unheld: BTreeMap::new(),
            cached: HashMap::new(),
            caching,
            tick: 0,
        }
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks some sequence holds.
    pub fn held(&self) -> usize {
        self.total() - self.free.len() - self.unheld.len()
    }

    /// Blocks that [`allocate`](Self::allocate) can hand out once `hits` (blocks a sequence is
    /// about to take from the cache) are held: a hit that nobody holds now is no longer
    /// available after.
    pub fn available_besides(&self, hits: &[(BlockId, BlockHash)]) -> usize {
        let unheld_hits = hits
            .iter()
            .filter(|(block, _)| self.blocks[*block as usize].holders == 0)
            .count();
        self.free.len() + self.unheld.len() - unheld_hits
    }

    /// The cached blocks that hold the start of a sequence, given its full blocks' contents
    /// in order, with their hashes (the chain from `root`): the longest run found. Nothing
    /// is taken; [`hold`](Self::hold) takes them.
    pub fn lookup<'a>(
        &self,
        root: BlockHash,
        blocks: impl IntoIterator<Item = BlockContent<'a>>,
    ) -> Vec<(BlockId, BlockHash)> {
        if !self.caching {
            return Vec::new();
        }
        let mut parent = root;
        let mut hits = Vec::new();
        for content in blocks {
            let hash = parent.child(content);
            match self.cached.get(&hash) {
                Some(&block) => hits.push((block, hash)),
                None => break,
            }
            parent = hash;
        }
        hits
    }

    /// Takes one more hold on each of `blocks` (cached blocks a sequence starts from).
    pub fn hold(&mut self, blocks: &[(BlockId, BlockHash)]) {
        for &(block, _) in blocks {
            let state = &mut self.blocks[block as usize];
            if let Some(tick) = state.released.take() {
                self.unheld.remove(&tick);
            }
            state.holders += 1;
        }
    }

    /// A block for a sequence to write: a free one, else the least recently used cached one
    /// nobody holds (its prefix forgotten). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.unheld.pop_first()?;
                let state = &mut self.blocks[block as usize];
                state.released = None;
                if let Some(hash) = state.hash.take() {
                    self.cached.remove(&hash);
                }
                block
            }
        };
        self.blocks[block as usize].holders = 1;
        Some(block)
    }

    /// Gives up one hold on each of `blocks` (a sequence's, in its order). A block nobody
    /// holds any more stays cached if it holds a prefix, else it is free. The last blocks are
    /// released first, so they are the first reused: a prefix's start is what others share.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            let state = &mut self.blocks[block as usize];
            debug_assert!(state.holders > 0, "block {block} released more than held");
            state.holders = state.holders.saturating_sub(1);
            if state.holders > 0 {
                continue;
            }
            if state.hash.is_some() {
                self.tick += 1;
                state.released = Some(self.tick);
                self.unheld.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Records that `block`, now full, holds `content` after the prefix `parent` names, so
    /// later sequences can start from it. Returns the block's hash (the next block's parent).
    /// When another block already holds that prefix (two sequences read the same prompt at
    /// once), that one stays the cached copy and this one is freed when released.
    pub fn register(
        &mut self,
        block: BlockId,
        parent: BlockHash,
        content: BlockContent<'_>,
    ) -> BlockHash {
        debug_assert_eq!(content.tokens.len(), BLOCK_SIZE);
        let hash = parent.child(content);
        if self.caching && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, block);
            self.blocks[block as usize].hash = Some(hash);
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(first: u32, blocks: usize) -> Vec<u32> {
        (first..first + (blocks * BLOCK_SIZE) as u32).collect()
    }

    fn contents(tokens: &[u32]) -> impl Iterator<Item = BlockContent<'_>> {
        tokens.chunks_exact(BLOCK_SIZE).map(|tokens| BlockContent {
            tokens,
            row_kernel: 0,
        })
    }

    /// Writes `tokens` into newly allocated blocks and registers each, as a sequence does.
    fn fill(pool: &mut BlockPool, root: BlockHash, tokens: &[u32]) -> Vec<BlockId> {
        let mut parent = root;
        let mut blocks = Vec::new();
        for content in contents(tokens) {
            let block = pool.allocate().expect("a free block");
            parent = pool.register(block, parent, content);
            blocks.push(block);
        }
        blocks
    }

    #[test]
    fn a_released_prefix_is_found_again_block_by_block() {
        let root = BlockHash::root("m");
        let mut pool = BlockPool::new(8, true);
        let prompt = tokens(100, 3);
        let blocks = fill(&mut pool, root, &prompt);
        assert_eq!(pool.held(), 3);
        pool.release(&blocks);
        assert_eq!(pool.held(), 0);
        assert_eq!(pool.available_besides(&[]), 8);

        // The same prompt, longer: its three blocks are found, in order.
        let mut longer = prompt.clone();
        longer.extend(tokens(7, 1));
        let hits = pool.lookup(root, contents(&longer));
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), blocks);
        // Holding them takes them out of what can be handed out.
        assert_eq!(pool.available_besides(&hits), 5);
        pool.hold(&hits);
        assert_eq!(pool.held(), 3);
        assert_eq!(pool.available_besides(&[]), 5);

        // A prompt that differs in its second block hits only the first.
        let mut other = prompt.clone();
        other[BLOCK_SIZE + 3] = 9;
        assert_eq!(pool.lookup(root, contents(&other)).len(), 1);
        // Another model's root hits nothing; a partial block is never a hit.
        assert!(
            pool.lookup(BlockHash::root("n"), contents(&prompt))
                .is_empty()
        );
        assert_eq!(
            pool.lookup(root, contents(&prompt[..BLOCK_SIZE - 1])).len(),
            0
        );
    }

    #[test]
    fn cached_blocks_are_reused_last_and_least_recently_released_first() {
        let root = BlockHash::root("m");
        let mut pool = BlockPool::new(4, true);
        let a = fill(&mut pool, root, &tokens(0, 2));
        pool.release(&a);
        let b = fill(&mut pool, root, &tokens(500, 1));
        pool.release(&b);
        // One free block is left: it goes before any cached one.
        let fresh = pool.allocate().unwrap();
        assert!(!a.contains(&fresh) && !b.contains(&fresh));
        // Then the cached ones, least recently released first: `a`'s last block (released
        // before its first), then `a`'s first; `b`'s stays cached.
        assert_eq!(pool.allocate(), Some(a[1]));
        assert_eq!(pool.allocate(), Some(a[0]));
        assert!(pool.lookup(root, contents(&tokens(0, 2))).is_empty());
        assert_eq!(pool.lookup(root, contents(&tokens(500, 1))).len(), 1);
        assert_eq!(pool.allocate(), Some(b[0]));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn a_shared_block_is_freed_by_its_last_holder_and_the_first_copy_stays_cached() {
        let root = BlockHash::root("m");
        let mut pool = BlockPool::new(4, true);
        let prompt = tokens(0, 1);
        let first = fill(&mut pool, root, &prompt);
        // A second sequence read the same block at the same time: its copy is not cached.
        let second = fill(&mut pool, root, &prompt);
        assert_eq!(pool.lookup(root, contents(&prompt))[0].0, first[0]);
        pool.release(&second);
        assert_eq!(pool.held(), 1);
        // A third sequence shares the cached one.
        let hits = pool.lookup(root, contents(&prompt));
        pool.hold(&hits);
        pool.release(&first);
        assert_eq!(pool.held(), 1);
        pool.release(&[hits[0].0]);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn without_caching_nothing_is_found() {
        let root = BlockHash::root("m");
        let mut pool = BlockPool::new(2, false);
        let blocks = fill(&mut pool, root, &tokens(0, 2));
        pool.release(&blocks);
        assert!(pool.lookup(root, contents(&tokens(0, 2))).is_empty());
        assert_eq!(pool.available_besides(&[]), 2);
    }
}
