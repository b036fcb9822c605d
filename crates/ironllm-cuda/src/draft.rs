//! The draft model of speculative decoding on the GPU (`"method": "draft_model"`): a smaller model of the
//! same tokenizer that drafts greedily, as the CPU's `ironllm_model::proposer::DraftModel` does.
//!
//! Its KV cache has the target's block geometry and is read and written through the target's block tables,
//! so the scheduler's one block allocation covers both models (the runner sizes the cache with both
//! models' bytes per block). After a step has sampled, each request the plan names is drafted for: one
//! forward over the tokens the draft has not seen (a whole prompt the first time), then one single-token
//! forward per further draft, each feeding the previous draft at the position it would take; the argmax
//! comes from the GPU sampler with greedy rows. Drafted tokens' KV lands in the lookahead slots the
//! scheduler reserved; the next round restarts from the last real token, so rejected drafts are
//! overwritten. Greedy drafting makes the proposal a deterministic function of the context, which is what
//! makes the runner's compare-with-own-samples verification exact.

use std::sync::Arc;

use ironllm_core::outputs::{ModelRunnerOutput, SchedulerOutput};
use ironllm_core::SamplingParams;
use ironllm_model::proposer::{DraftLimits, DraftRounds, DraftSeq};
use ironllm_model::runner_state::RunnerRequests;

use crate::device::Gpu;
use crate::error::CudaError;
use crate::model::{CudaKvCache, CudaLlama, Workspace};
use crate::ops::FLASH_BLOCK_M;
use crate::runner::{DeviceBatch, HostBatch};
use crate::sampler::{GpuSampler, GpuSamplingRow};

/// A greedy draft model with its own KV cache over the target's blocks.
pub struct CudaDraftModel {
    gpu: Arc<Gpu>,
    model: Arc<CudaLlama>,
    kv: CudaKvCache,
    ws: Workspace,
    sampler: GpuSampler,
    host: HostBatch,
    dev: DeviceBatch,
    num_speculative_tokens: usize,
    greedy: SamplingParams,
    rounds: DraftRounds,
}

impl CudaDraftModel {
    /// Buffers for forwards of up to `max_tokens` tokens and `max_seqs` sequences; the KV cache comes
    /// later ([`set_num_blocks`](Self::set_num_blocks)), once the runner has sized it.
    pub fn new(
        model: Arc<CudaLlama>,
        num_speculative_tokens: usize,
        max_tokens: usize,
        max_seqs: usize,
        block_size: usize,
    ) -> Result<CudaDraftModel, CudaError> {
        let gpu = model.gpu().clone();
        let vocab = model.config.vocab_size;
        Ok(CudaDraftModel {
            // The draft never reports prompt logprobs: a one-row prompt chunk.
            ws: Workspace::new(&gpu, &model, max_tokens, max_seqs, 1)?,
            sampler: GpuSampler::new(gpu.clone(), vocab)?,
            host: HostBatch::default(),
            dev: DeviceBatch::new(&gpu, max_tokens, max_seqs, 1, max_seqs, vocab)?,
            kv: CudaKvCache::new(&gpu, &model, 1, block_size)?,
            gpu,
            model,
            num_speculative_tokens,
            greedy: SamplingParams::greedy(1),
            rounds: DraftRounds::default(),
        })
    }

    /// Bytes one KV block of the draft model takes.
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        CudaKvCache::bytes_per_block(&self.model.config, self.model.dtype, block_size)
    }

    /// Allocates the draft's KV cache with the target's block count.
    pub fn set_num_blocks(&mut self, num_blocks: usize, block_size: usize) -> Result<(), CudaError> {
        self.kv = CudaKvCache::new(&self.gpu, &self.model, num_blocks, block_size)?;
        Ok(())
    }

    /// Draft tokens for every request of `out` that sampled this step and that `plan` asks drafts for.
    pub fn propose(
        &mut self,
        plan: &SchedulerOutput,
        out: &ModelRunnerOutput,
        reqs: &RunnerRequests<u64>,
        block_size: usize,
    ) -> Result<Vec<Vec<u32>>, CudaError> {
        let limits = DraftLimits {
            max_positions: self.model.max_positions,
            vocab_size: self.model.config.vocab_size,
            max_tokens: self.ws.max_tokens(),
            max_seqs: self.ws.max_rows(),
            num_speculative_tokens: self.num_speculative_tokens,
        };
        let mut rounds = std::mem::take(&mut self.rounds);
        let drafts = rounds.propose(plan, out, reqs, block_size, &limits, |seqs| self.forward_argmax(seqs, block_size));
        self.rounds = rounds;
        drafts
    }

    /// One forward of `seqs` (single-token sequences first, as the attention kernels expect) and the
    /// argmax after each sequence's last token.
    fn forward_argmax(&mut self, seqs: &[DraftSeq<'_>], block_size: usize) -> Result<Vec<u32>, CudaError> {
        let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].tokens.len() == 1).collect();
        let num_decode = order.len();
        order.extend((0..seqs.len()).filter(|&i| seqs[i].tokens.len() != 1));
        let max_blocks =
            seqs.iter().map(|s| (s.first_pos + s.tokens.len()).div_ceil(block_size)).max().unwrap_or(1).max(1);
        let h = &mut self.host;
        h.clear();
        h.query_start_loc.push(0);
        for (b, &i) in order.iter().enumerate() {
            let s = &seqs[i];
            for (j, &t) in s.tokens.iter().enumerate() {
                let pos = s.first_pos + j;
                h.token_ids.push(t);
                h.positions.push(pos as i32);
                h.slots.push(s.table[pos / block_size] as i64 * block_size as i64 + (pos % block_size) as i64);
                h.token_to_seq.push(b as i32);
            }
            h.query_start_loc.push(h.token_ids.len() as i32);
            h.context_lens.push((s.first_pos + s.tokens.len()) as i32);
            let row = h.block_tables.len();
            h.block_tables.extend(s.table.iter().take(max_blocks).map(|&x| x as i32));
            h.block_tables.resize(row + max_blocks, 0);
            h.logits_rows.push(h.token_ids.len() as i32 - 1);
            if b >= num_decode {
                for tile in (0..s.tokens.len()).step_by(FLASH_BLOCK_M) {
                    h.tiles.push(b as i32);
                    h.tiles.push(tile as i32);
                }
            }
        }
        self.dev.upload(&self.gpu, &self.host)?;
        let h = &self.host;
        let meta = self.dev.meta(
            h.token_ids.len(),
            order.len(),
            max_blocks,
            num_decode,
            h.tiles.len() / 2,
            max_blocks * block_size,
            None,
        );
        let rows = order.len();
        self.model.forward(
            &self.dev.token_ids,
            &meta,
            &self.dev.logits_rows,
            rows,
            &mut self.kv,
            &mut self.ws,
            None,
        )?;
        let vocab = self.model.config.vocab_size;
        let sample_rows: Vec<GpuSamplingRow<'_>> = (0..rows)
            .map(|_| GpuSamplingRow { params: &self.greedy, prompt_token_ids: &[], output_token_ids: &[], seed: 0 })
            .collect();
        let mut view = self.ws.logits.data.slice_mut(0..rows * vocab * 4);
        // SAFETY: the bytes are f32 logits written by the LM head GEMM.
        let mut view = unsafe { view.transmute_mut::<f32>(rows * vocab) }
            .ok_or_else(|| CudaError::Invalid("draft logits view".into()))?;
        let sampled = self.sampler.sample(&mut view, &sample_rows)?;
        // Back from batch order to `seqs` order.
        let mut next = vec![0u32; seqs.len()];
        for (b, &i) in order.iter().enumerate() {
            next[i] = sampled.get(b).map_or(0, |t| t.token_id);
        }
        Ok(next)
    }
}
