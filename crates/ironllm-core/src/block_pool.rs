//! The block pool: owns every KV cache block, its reference count and, for full blocks, its hash; keeps
//! the free blocks in an LRU queue and a hash -> block map of cached blocks (automatic prefix caching).
//!
//! Invariants (checked by [`BlockPool::check_invariants`]):
//! - a block is in the free queue exactly when its reference count is 0;
//! - a block carries `Some(hash)` exactly when the cache map sends that hash to it;
//! - free-queue operations are O(1): the queue is a doubly linked list threaded through per-block
//!   `prev`/`next` indices, so taking a cached block back out of the middle is no search.
//!
//! A freed block keeps its hash and stays findable until it is reused ("evicted") by
//! [`BlockPool::get_new_blocks`], which takes blocks from the front of the queue: the least recently
//! freed first. Callers free a request's blocks tail-first so its later blocks are evicted before its
//! earlier ones, which other requests are more likely to share. This is vLLM V1's `BlockPool` and
//! `FreeKVCacheBlockQueue` (`vllm/v1/core/block_pool.py`, `kv_cache_utils.py`), written anew.
//!
//! Unlike vLLM we reserve no null block: every block is usable. vLLM's block 0 stands in for skipped
//! blocks of sliding-window layers; we have none yet, and a runner that pads a batch writes to no slot
//! at all rather than to a scratch block.

use std::collections::HashMap;

use crate::outputs::BlockId;

/// The prefix-cache key of one full block: a 128-bit hash of (parent block's hash, the block's token
/// ids, extra key).
///
/// Why our own hash: it must be stable across runs and Rust versions (std's `DefaultHasher` promises
/// neither) so hashes can later name KV blocks outside this process (offloading, disaggregated
/// prefill), and at 128 bits an accidental collision, which would silently hand one prompt another's
/// KV, is negligible (about n^2 / 2^129 for n cached blocks). It is not a cryptographic hash: if
/// tenants that distrust each other share a server, swap in SHA-256 here (vLLM's
/// `--prefix-caching-hash-algo sha256`); nothing else depends on how the 128 bits are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

/// Hashes one full block given its parent's hash (`None` for the first block of a sequence).
pub fn hash_block_tokens(parent: Option<BlockHash>, token_ids: &[u32], extra_key: Option<u64>) -> BlockHash {
    let mut hasher = Hasher128::new();
    match parent {
        None => hasher.write(0),
        Some(BlockHash(parent)) => {
            hasher.write(1);
            hasher.write(parent as u64);
            hasher.write((parent >> 64) as u64);
        }
    }
    // The length comes first so that packing two u32 tokens per word is unambiguous.
    hasher.write(token_ids.len() as u64);
    for pair in token_ids.chunks(2) {
        let hi = pair.get(1).copied().unwrap_or(0) as u64;
        hasher.write(pair[0] as u64 | (hi << 32));
    }
    match extra_key {
        None => hasher.write(0),
        Some(key) => {
            hasher.write(1);
            hasher.write(key);
        }
    }
    hasher.finish()
}

/// Two independent 64-bit multiply-rotate lanes, each finished with MurmurHash3's `fmix64` avalanche.
/// Small, fast over a 16-token block, and fixed forever by the constants below.
struct Hasher128 {
    lo: u64,
    hi: u64,
}

impl Hasher128 {
    const P1: u64 = 0x9E37_79B9_7F4A_7C15;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;

    fn new() -> Self {
        Hasher128 { lo: 0x243F_6A88_85A3_08D3, hi: 0x1319_8A2E_0370_7344 }
    }

    fn write(&mut self, word: u64) {
        self.lo = (self.lo.rotate_left(23) ^ word).wrapping_mul(Self::P1);
        self.hi = (self.hi.rotate_left(29) ^ word.wrapping_add(Self::P3)).wrapping_mul(Self::P2);
    }

    fn finish(self) -> BlockHash {
        let lo = fmix64(self.lo ^ self.hi.rotate_left(32));
        let hi = fmix64(self.hi.wrapping_add(lo));
        BlockHash(((hi as u128) << 64) | lo as u128)
    }
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^ (k >> 33)
}

/// "No block" in the free queue's links.
const NIL: u32 = u32::MAX;

/// The free blocks in eviction order, as a doubly linked list over block indices.
#[derive(Debug, Clone)]
struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// All blocks free, in index order.
    fn new(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n).map(|i| if i + 1 == n { NIL } else { i + 1 }).collect();
        let (head, tail) = if n == 0 { (NIL, NIL) } else { (0, n - 1) };
        FreeBlockQueue { prev, next, head, tail, len: num_blocks }
    }

    /// Membership follows from the links: only the head has no predecessor while in the queue.
    fn contains(&self, idx: u32) -> bool {
        self.head == idx || self.prev[idx as usize] != NIL
    }

    fn push_back(&mut self, idx: u32) {
        debug_assert!(!self.contains(idx), "block {idx} is already free");
        self.prev[idx as usize] = self.tail;
        self.next[idx as usize] = NIL;
        if self.tail == NIL {
            self.head = idx;
        } else {
            self.next[self.tail as usize] = idx;
        }
        self.tail = idx;
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let idx = self.head;
        if idx == NIL {
            return None;
        }
        self.remove(idx);
        Some(idx)
    }

    fn remove(&mut self, idx: u32) {
        debug_assert!(self.contains(idx), "block {idx} is not free");
        let (prev, next) = (self.prev[idx as usize], self.next[idx as usize]);
        if prev == NIL {
            self.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.prev[idx as usize] = NIL;
        self.next[idx as usize] = NIL;
        self.len -= 1;
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), |&idx| {
            let next = self.next[idx as usize];
            (next != NIL).then_some(next)
        })
    }
}

/// Every KV block of one cache, with reference counts, the LRU free queue and the prefix-cache map.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Per block: how many requests' block tables hold it.
    ref_counts: Vec<u32>,
    /// Per block: its hash while it is findable in `cached_blocks`.
    hashes: Vec<Option<BlockHash>>,
    free_queue: FreeBlockQueue,
    /// Full, computed blocks by hash. One block per hash: when two requests computed the same block
    /// side by side, the second copy is simply not cached.
    cached_blocks: HashMap<BlockHash, BlockId>,
    enable_caching: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks. `num_blocks` must fit in a `u32` below `u32::MAX`
    /// ([`crate::scheduler::SchedulerConfig::validate`] checks it).
    pub fn new(num_blocks: usize, enable_caching: bool) -> BlockPool {
        assert!(num_blocks < NIL as usize, "num_blocks {num_blocks} does not fit a BlockId");
        BlockPool {
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            free_queue: FreeBlockQueue::new(num_blocks),
            cached_blocks: HashMap::new(),
            enable_caching,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no request holds, cached ones included (they are evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.free_queue.len
    }

    /// Fraction of blocks held by requests, in [0, 1] (vLLM's `kv_cache_usage`).
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.num_blocks() as f64
    }

    pub fn enable_caching(&self) -> bool {
        self.enable_caching
    }

    /// The cached block holding `hash`, if any (held or free).
    pub fn get_cached_block(&self, hash: BlockHash) -> Option<BlockId> {
        if !self.enable_caching {
            return None;
        }
        self.cached_blocks.get(&hash).copied()
    }

    /// Takes a reference on each block (prefix-cache hits), pulling free ones out of the free queue.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            let idx = block.0 as usize;
            if self.ref_counts[idx] == 0 {
                self.free_queue.remove(block.0);
            }
            self.ref_counts[idx] += 1;
        }
    }

    /// Takes `n` blocks from the front of the free queue (least recently freed first), each with one
    /// reference; a cached block taken this way is evicted from the prefix cache. `None`, with nothing
    /// changed, when fewer than `n` blocks are free.
    pub fn get_new_blocks(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free_blocks() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        while blocks.len() < n {
            let idx = self.free_queue.pop_front()?;
            if let Some(hash) = self.hashes[idx as usize].take() {
                self.cached_blocks.remove(&hash);
            }
            self.ref_counts[idx as usize] = 1;
            blocks.push(BlockId(idx));
        }
        Some(blocks)
    }

    /// Drops one reference from each block; blocks reaching 0 join the back of the free queue in the
    /// order given, keeping their hash so a later request can still hit them.
    ///
    /// Panics on a block with no reference: that is a double free, a bug in the caller.
    pub fn free_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for block in blocks {
            let idx = block.0 as usize;
            assert!(self.ref_counts[idx] > 0, "double free of block {}", block.0);
            self.ref_counts[idx] -= 1;
            if self.ref_counts[idx] == 0 {
                self.free_queue.push_back(block.0);
            }
        }
    }

    /// Records the hashes of newly full, computed blocks so later requests can hit them. A block that
    /// already has a hash is skipped, as is a hash some other block already holds.
    pub fn cache_full_blocks(&mut self, blocks: &[BlockId], hashes: &[BlockHash]) {
        if !self.enable_caching {
            return;
        }
        debug_assert_eq!(blocks.len(), hashes.len());
        for (&block, &hash) in blocks.iter().zip(hashes) {
            let slot = &mut self.hashes[block.0 as usize];
            if slot.is_some() {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(entry) = self.cached_blocks.entry(hash) {
                entry.insert(block);
                *slot = Some(hash);
            }
        }
    }

    /// Forgets every cached hash. Refused (returns `false`) while any block is held, as in vLLM: a
    /// running request's blocks must stay consistent with its recorded cache state.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free_blocks() != self.num_blocks() {
            return false;
        }
        self.cached_blocks.clear();
        self.hashes.iter_mut().for_each(|hash| *hash = None);
        true
    }

    /// How many block tables hold `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block.0 as usize]
    }

    /// Whether `block` is in the free queue.
    pub fn is_free(&self, block: BlockId) -> bool {
        self.free_queue.contains(block.0)
    }

    /// The hash under which `block` is findable, if any.
    pub fn block_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.hashes[block.0 as usize]
    }

    /// Blocks findable in the prefix cache (held or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached_blocks.len()
    }

    /// The free blocks in eviction order (first = evicted first).
    pub fn free_queue_order(&self) -> Vec<BlockId> {
        self.free_queue.iter().map(BlockId).collect()
    }

    /// Checks the pool's internal invariants (see the module docs); `Err` names the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let order: Vec<u32> = self.free_queue.iter().take(self.num_blocks() + 1).collect();
        if order.len() != self.free_queue.len {
            return Err(format!("free queue walks {} blocks but counts {}", order.len(), self.free_queue.len));
        }
        let mut seen = vec![false; self.num_blocks()];
        for &idx in &order {
            if std::mem::replace(&mut seen[idx as usize], true) {
                return Err(format!("block {idx} is in the free queue twice"));
            }
        }
        for (idx, &ref_count) in self.ref_counts.iter().enumerate() {
            if seen[idx] != (ref_count == 0) {
                return Err(format!("block {idx} has ref count {ref_count} but free-queue membership {}", seen[idx]));
            }
            if seen[idx] != self.free_queue.contains(idx as u32) {
                return Err(format!("block {idx}: free-queue links disagree with a walk"));
            }
            if let Some(hash) = self.hashes[idx] {
                if self.cached_blocks.get(&hash) != Some(&BlockId(idx as u32)) {
                    return Err(format!("block {idx} has a hash the cache map does not send to it"));
                }
            }
        }
        for (hash, block) in &self.cached_blocks {
            if self.hashes[block.0 as usize] != Some(*hash) {
                return Err(format!("cache map sends a hash to block {} without it", block.0));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u32]) -> Vec<BlockId> {
        raw.iter().copied().map(BlockId).collect()
    }

    fn hash(n: u32) -> BlockHash {
        hash_block_tokens(None, &[n], None)
    }

    #[test]
    fn hash_is_stable_and_chains() {
        // Golden value: changing the hash function silently would orphan persisted or shared caches.
        let first = hash_block_tokens(None, &[1, 2, 3, 4], None);
        assert_eq!(first, BlockHash(GOLDEN_FIRST_BLOCK));
        let second = hash_block_tokens(Some(first), &[5, 6, 7, 8], None);
        // The same tokens under a different parent or extra key hash differently.
        assert_ne!(second, hash_block_tokens(None, &[5, 6, 7, 8], None));
        assert_ne!(second, hash_block_tokens(Some(first), &[5, 6, 7, 8], Some(0)));
        assert_ne!(first, hash_block_tokens(None, &[1, 2, 3, 5], None));
        // Packing pairs must not confuse a trailing zero token with a shorter block.
        assert_ne!(hash_block_tokens(None, &[1], None), hash_block_tokens(None, &[1, 0], None));
    }

    const GOLDEN_FIRST_BLOCK: u128 = 0x7396_B173_24BA_62DF_2CD5_C8DC_E9E8_BE1F;

    #[test]
    fn new_pool_is_all_free_in_index_order() {
        let pool = BlockPool::new(4, true);
        assert_eq!(pool.num_free_blocks(), 4);
        assert_eq!(pool.free_queue_order(), ids(&[0, 1, 2, 3]));
        assert_eq!(pool.usage(), 0.0);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn get_new_blocks_refuses_without_partial_allocation() {
        let mut pool = BlockPool::new(3, true);
        assert_eq!(pool.get_new_blocks(4), None);
        assert_eq!(pool.num_free_blocks(), 3);
        assert_eq!(pool.get_new_blocks(2), Some(ids(&[0, 1])));
        assert!((pool.usage() - 2.0 / 3.0).abs() < 1e-12);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn eviction_is_least_recently_freed_first() {
        let mut pool = BlockPool::new(6, true);
        let blocks = pool.get_new_blocks(6).unwrap();
        pool.cache_full_blocks(&blocks, &(0..6).map(hash).collect::<Vec<_>>());
        // Request A held 0,1,2 and frees tail-first; later request B frees 3,4,5 tail-first.
        pool.free_blocks(ids(&[2, 1, 0]));
        pool.free_blocks(ids(&[5, 4, 3]));
        assert_eq!(pool.free_queue_order(), ids(&[2, 1, 0, 5, 4, 3]));
        // Cached blocks stay findable while free.
        assert_eq!(pool.get_cached_block(hash(0)), Some(BlockId(0)));
        // Reusing two blocks evicts A's tail first, and their hashes go with them.
        assert_eq!(pool.get_new_blocks(2), Some(ids(&[2, 1])));
        assert_eq!(pool.get_cached_block(hash(2)), None);
        assert_eq!(pool.get_cached_block(hash(1)), None);
        assert_eq!(pool.get_cached_block(hash(0)), Some(BlockId(0)));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn touch_takes_a_cached_block_out_of_the_middle_of_the_queue() {
        let mut pool = BlockPool::new(4, true);
        let blocks = pool.get_new_blocks(4).unwrap();
        pool.cache_full_blocks(&blocks, &(0..4).map(hash).collect::<Vec<_>>());
        pool.free_blocks(blocks.iter().rev().copied());
        let hit = pool.get_cached_block(hash(1)).unwrap();
        pool.touch(&[hit]);
        pool.touch(&[hit]);
        assert_eq!(pool.ref_count(hit), 2);
        assert!(!pool.is_free(hit));
        assert_eq!(pool.free_queue_order(), ids(&[3, 2, 0]));
        pool.free_blocks([hit]);
        assert!(!pool.is_free(hit));
        pool.free_blocks([hit]);
        // Freed again: it goes to the back, the most recently used end.
        assert_eq!(pool.free_queue_order(), ids(&[3, 2, 0, 1]));
        assert_eq!(pool.get_cached_block(hash(1)), Some(hit));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn a_hash_is_cached_once() {
        let mut pool = BlockPool::new(2, true);
        let blocks = pool.get_new_blocks(2).unwrap();
        pool.cache_full_blocks(&blocks[..1], &[hash(7)]);
        pool.cache_full_blocks(&blocks[1..], &[hash(7)]);
        assert_eq!(pool.get_cached_block(hash(7)), Some(blocks[0]));
        assert_eq!(pool.block_hash(blocks[1]), None);
        pool.check_invariants().unwrap();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut pool = BlockPool::new(2, true);
        let blocks = pool.get_new_blocks(1).unwrap();
        pool.free_blocks(blocks.clone());
        pool.free_blocks(blocks);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut pool = BlockPool::new(2, false);
        let blocks = pool.get_new_blocks(1).unwrap();
        pool.cache_full_blocks(&blocks, &[hash(1)]);
        assert_eq!(pool.get_cached_block(hash(1)), None);
        assert_eq!(pool.num_cached_blocks(), 0);
    }

    #[test]
    fn reset_prefix_cache_only_when_nothing_is_held() {
        let mut pool = BlockPool::new(2, true);
        let blocks = pool.get_new_blocks(1).unwrap();
        pool.cache_full_blocks(&blocks, &[hash(1)]);
        assert!(!pool.reset_prefix_cache());
        pool.free_blocks(blocks);
        assert!(pool.reset_prefix_cache());
        assert_eq!(pool.get_cached_block(hash(1)), None);
        pool.check_invariants().unwrap();
    }
}
