//! The KV cache manager: answers the scheduler's two questions, "which leading blocks of this request are
//! already computed?" ([`KvCacheManager::get_computed_blocks`]) and "can I have slots for N more tokens?"
//! ([`KvCacheManager::allocate_slots`]), and keeps each running request's block table.
//!
//! Invariant: a block's reference count in the pool equals the number of block tables here that hold
//! it; a request has a block table exactly while it is running.
//!
//! Blocks are hashed and cached only after their tokens have been computed
//! ([`KvCacheManager::cache_blocks`], called when the step's output comes back), so a prefix hit never
//! reads KV that is still being written. vLLM V1 caches at allocation time instead, relying on its
//! runner writing a layer's KV before that layer's attention; caching afterwards does not tie the
//! scheduler to how the runner orders its work. The shape follows vLLM V1's `KVCacheManager`
//! (`vllm/v1/core/kv_cache_manager.py`) and nano-vllm's `BlockManager`.

use std::collections::HashMap;

use crate::block_pool::BlockPool;
use crate::outputs::BlockId;
use crate::request::Request;

/// A running request's blocks.
#[derive(Debug, Clone, Default)]
struct RequestBlocks {
    /// Block i holds the KV of tokens [i * block_size, (i + 1) * block_size).
    block_ids: Vec<BlockId>,
    /// Leading blocks already offered to the prefix cache.
    num_cached_blocks: usize,
}

/// Block tables for running requests over one [`BlockPool`].
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    block_size: usize,
    block_pool: BlockPool,
    requests: HashMap<String, RequestBlocks>,
    /// Tokens looked up in the prefix cache, counted once per admission (vLLM's
    /// `vllm:prefix_cache_queries`).
    prefix_cache_queries: u64,
    /// Of those, tokens served from the cache (`vllm:prefix_cache_hits`).
    prefix_cache_hits: u64,
}

impl KvCacheManager {
    /// `block_size` must be at least 1 ([`crate::scheduler::SchedulerConfig::validate`] checks it).
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> KvCacheManager {
        assert!(block_size > 0, "block_size must be at least 1");
        KvCacheManager {
            block_size,
            block_pool: BlockPool::new(num_blocks, enable_caching),
            requests: HashMap::new(),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn block_pool(&self) -> &BlockPool {
        &self.block_pool
    }

    /// A running request's block table.
    pub fn block_table(&self, request_id: &str) -> Option<&[BlockId]> {
        self.requests.get(request_id).map(|r| r.block_ids.as_slice())
    }

    /// Ids of the requests holding a block table.
    pub fn request_ids(&self) -> impl Iterator<Item = &str> {
        self.requests.keys().map(String::as_str)
    }

    pub fn num_free_blocks(&self) -> usize {
        self.block_pool.num_free_blocks()
    }

    /// Fraction of blocks held by requests.
    pub fn usage(&self) -> f64 {
        self.block_pool.usage()
    }

    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_cache_queries
    }

    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_cache_hits
    }

    /// Forgets every cached block; refused while any request holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.block_pool.reset_prefix_cache()
    }

    /// Whether prefix-cache lookups apply to `request`. Not for requests that want prompt logprobs:
    /// those need logits at every prompt position, so every prompt token must be computed (as in vLLM).
    fn lookup_applies(&self, request: &Request) -> bool {
        self.block_pool.enable_caching() && request.sampling_params.prompt_logprobs.is_none()
    }

    /// The longest run of leading full blocks of `request` found in the prefix cache, and the number of
    /// tokens they cover. Never the whole sequence: the last token is always left to compute so the step
    /// produces logits, and since hits are whole blocks, a sequence that would hit entirely backs off
    /// by its last block (as vLLM does). Nothing is reserved: pass the blocks to
    /// [`KvCacheManager::allocate_slots`] in the same scheduling pass.
    pub fn get_computed_blocks(&mut self, request: &mut Request) -> (Vec<BlockId>, usize) {
        if !self.lookup_applies(request) || request.num_tokens() == 0 {
            return (Vec::new(), 0);
        }
        request.update_block_hashes(self.block_size);
        let max_hit_blocks = (request.num_tokens() - 1) / self.block_size;
        let blocks: Vec<BlockId> = request
            .block_hashes()
            .iter()
            .take(max_hit_blocks)
            .map_while(|&hash| self.block_pool.get_cached_block(hash))
            .collect();
        let num_computed_tokens = blocks.len() * self.block_size;
        (blocks, num_computed_tokens)
    }

    /// Grows `request`'s block table to hold its computed tokens, `new_computed_blocks` (prefix hits
    /// from [`KvCacheManager::get_computed_blocks`], only when the request is being admitted) and
    /// `num_new_tokens` more. Returns the freshly allocated blocks (hits excluded), or `None`, changing
    /// nothing, when the pool cannot supply them; free cached blocks count as available since they can
    /// be evicted.
    pub fn allocate_slots(
        &mut self,
        request: &Request,
        num_new_tokens: usize,
        new_computed_blocks: &[BlockId],
    ) -> Option<Vec<BlockId>> {
        let held = self.requests.get(&request.request_id);
        let admitting = held.is_none();
        let num_held_blocks = held.map_or(0, |r| r.block_ids.len());
        debug_assert!(
            new_computed_blocks.is_empty() || num_held_blocks == 0,
            "prefix hits are only taken when a request is admitted"
        );
        let num_total_tokens =
            request.num_computed_tokens + new_computed_blocks.len() * self.block_size + num_new_tokens;
        let num_new_blocks =
            num_total_tokens.div_ceil(self.block_size).saturating_sub(num_held_blocks + new_computed_blocks.len());
        // Touching a free hit takes it out of the free queue, so it cannot also serve as a new block.
        let num_free_hits = new_computed_blocks.iter().filter(|&&block| self.block_pool.ref_count(block) == 0).count();
        if num_new_blocks + num_free_hits > self.block_pool.num_free_blocks() {
            return None;
        }
        // Hits first, so taking new blocks cannot evict them.
        self.block_pool.touch(new_computed_blocks);
        let Some(new_blocks) = self.block_pool.get_new_blocks(num_new_blocks) else {
            self.block_pool.free_blocks(new_computed_blocks.iter().rev().copied());
            return None;
        };
        if admitting && self.lookup_applies(request) {
            self.prefix_cache_queries += request.num_tokens() as u64;
            self.prefix_cache_hits += (new_computed_blocks.len() * self.block_size) as u64;
        }
        let entry = self.requests.entry(request.request_id.clone()).or_default();
        if admitting {
            // Hit blocks already carry their hashes.
            entry.num_cached_blocks = new_computed_blocks.len();
        }
        entry.block_ids.extend_from_slice(new_computed_blocks);
        entry.block_ids.extend_from_slice(&new_blocks);
        Some(new_blocks)
    }

    /// Offers `request`'s newly full, computed blocks (up to `request.num_computed_tokens`) to the prefix
    /// cache. Call after the step that computed them.
    pub fn cache_blocks(&mut self, request: &mut Request) {
        let num_computed_tokens = request.num_computed_tokens;
        self.cache_blocks_through(request, num_computed_tokens);
    }

    /// Like [`KvCacheManager::cache_blocks`], up to `num_computed_tokens` (at most the request's known
    /// tokens): with async scheduling `request.num_computed_tokens` already counts a step still in
    /// flight, whose KV must not be offered before that step has succeeded.
    pub fn cache_blocks_through(&mut self, request: &mut Request, num_computed_tokens: usize) {
        if !self.block_pool.enable_caching() {
            return;
        }
        let Some(entry) = self.requests.get_mut(&request.request_id) else {
            return;
        };
        let num_computed_tokens = num_computed_tokens.min(request.num_tokens());
        let num_full_blocks = (num_computed_tokens / self.block_size).min(entry.block_ids.len());
        if num_full_blocks <= entry.num_cached_blocks {
            return;
        }
        request.update_block_hashes(self.block_size);
        let range = entry.num_cached_blocks..num_full_blocks;
        self.block_pool.cache_full_blocks(&entry.block_ids[range.clone()], &request.block_hashes()[range]);
        entry.num_cached_blocks = num_full_blocks;
    }

    /// Releases a request's blocks, tail first, so its later blocks are evicted before the earlier ones
    /// other requests are likelier to share. Unknown ids are ignored.
    pub fn free(&mut self, request_id: &str) {
        if let Some(entry) = self.requests.remove(request_id) {
            self.block_pool.free_blocks(entry.block_ids.into_iter().rev());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::SamplingParams;

    fn request(id: &str, prompt: Vec<u32>) -> Request {
        Request::new(id, prompt, Arc::new(SamplingParams::greedy(8)))
    }

    /// Admits `req` with whatever the cache offers and computes all its tokens.
    fn admit_and_compute(kv: &mut KvCacheManager, req: &mut Request) -> Vec<BlockId> {
        let (hits, num_hit_tokens) = kv.get_computed_blocks(req);
        let num_new_tokens = req.num_tokens() - num_hit_tokens;
        kv.allocate_slots(req, num_new_tokens, &hits).unwrap();
        req.num_computed_tokens = req.num_tokens();
        kv.cache_blocks(req);
        kv.block_table(&req.request_id).unwrap().to_vec()
    }

    #[test]
    fn prefix_hit_reuses_blocks_and_counts_tokens() {
        let mut kv = KvCacheManager::new(8, 4, true);
        let mut a = request("a", (0..10).collect());
        let a_blocks = admit_and_compute(&mut kv, &mut a);
        assert_eq!(a_blocks.len(), 3);
        // b shares a's first two full blocks, then diverges.
        let mut b = request("b", (0..8).chain([99, 98, 97]).collect());
        let (hits, n) = kv.get_computed_blocks(&mut b);
        assert_eq!((hits.as_slice(), n), (&a_blocks[..2], 8));
        let new = kv.allocate_slots(&b, 3, &hits).unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(kv.block_pool().ref_count(a_blocks[0]), 2);
        assert_eq!((kv.prefix_cache_queries(), kv.prefix_cache_hits()), (10 + 11, 8));
    }

    #[test]
    fn a_full_hit_backs_off_one_block() {
        let mut kv = KvCacheManager::new(8, 4, true);
        let mut a = request("a", (0..8).collect());
        admit_and_compute(&mut kv, &mut a);
        kv.free("a");
        let mut again = request("again", (0..8).collect());
        let (hits, n) = kv.get_computed_blocks(&mut again);
        assert_eq!((hits.len(), n), (1, 4), "the last block is recomputed so logits exist");
        // One more token and both blocks can hit.
        let mut longer = request("longer", (0..9).collect());
        assert_eq!(kv.get_computed_blocks(&mut longer).1, 8);
    }

    #[test]
    fn freed_blocks_stay_findable_and_tail_is_evicted_first() {
        let mut kv = KvCacheManager::new(5, 2, true);
        let mut a = request("a", (0..7).collect());
        let a_blocks = admit_and_compute(&mut kv, &mut a);
        kv.free("a");
        assert_eq!(kv.num_free_blocks(), 5);
        // a's blocks were freed tail first, after the one never-used block.
        let order = kv.block_pool().free_queue_order();
        assert_eq!(&order[1..], &[a_blocks[3], a_blocks[2], a_blocks[1], a_blocks[0]]);
        // Two new blocks evict the unused one, then a's partial last block; the full ones survive.
        let c = request("c", vec![50, 51, 52, 53]);
        kv.allocate_slots(&c, 4, &[]).unwrap();
        let mut a2 = request("a2", (0..7).collect());
        assert_eq!(kv.get_computed_blocks(&mut a2).1, 6);
    }

    #[test]
    fn allocation_fails_cleanly_and_counts_evictable_hits() {
        let mut kv = KvCacheManager::new(3, 2, true);
        let mut a = request("a", vec![1, 2, 3, 4, 5]);
        admit_and_compute(&mut kv, &mut a);
        kv.free("a");
        let mut b = request("b", vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let (hits, n) = kv.get_computed_blocks(&mut b);
        assert_eq!(n, 4);
        // Needs 2 hits (both free) + 2 new blocks = 4 > 3 free: refused, nothing taken.
        assert_eq!(kv.allocate_slots(&b, 4, &hits), None);
        assert_eq!(kv.num_free_blocks(), 3);
        assert!(kv.block_table("b").is_none());
        assert_eq!(kv.prefix_cache_queries(), 5, "a refused admission is not a query");
        // A shorter chunk fits: 2 hits + 1 new block.
        assert_eq!(kv.allocate_slots(&b, 2, &hits).map(|v| v.len()), Some(1));
        kv.block_pool().check_invariants().unwrap();
    }

    #[test]
    fn decode_grows_the_table_one_block_at_a_time() {
        let mut kv = KvCacheManager::new(4, 2, false);
        let mut a = request("a", vec![1, 2, 3]);
        assert_eq!(kv.allocate_slots(&a, 3, &[]).unwrap().len(), 2);
        a.num_computed_tokens = 3;
        a.append_output_token(4);
        // Token 4 lands in slot 3 of block 1: no new block.
        assert_eq!(kv.allocate_slots(&a, 1, &[]).unwrap().len(), 0);
        a.num_computed_tokens = 4;
        a.append_output_token(5);
        assert_eq!(kv.allocate_slots(&a, 1, &[]).unwrap().len(), 1);
        assert_eq!(kv.block_table("a").unwrap().len(), 3);
        kv.free("a");
        assert_eq!(kv.num_free_blocks(), 4);
    }

    #[test]
    fn prompt_logprobs_requests_skip_lookup() {
        let mut kv = KvCacheManager::new(8, 2, true);
        let mut a = request("a", vec![1, 2, 3, 4, 5]);
        admit_and_compute(&mut kv, &mut a);
        let params = SamplingParams { prompt_logprobs: Some(1), ..SamplingParams::default() };
        let mut b = Request::new("b", vec![1, 2, 3, 4, 5], Arc::new(params));
        assert_eq!(kv.get_computed_blocks(&mut b).1, 0);
    }
}
